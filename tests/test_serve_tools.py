"""ChatGLM3 tool calls through python -m serve, driven by the official `openai` client: the tools
render into ChatGLM3's tool prompt, the model's call comes back as `tool_calls`, the tool's result
goes back as the observation, and the model's final answer follows.

The model is a tiny ChatGLM3 trained here, in a few seconds, on the exact token sequences the
conversation must produce (the prompts as ChatGLM3 renders them, written out below independently of
the server), so that greedy decoding answers each prompt with its scripted reply.
"""

import json
import shutil

import openai
import pytest
import torch
from transformers import AutoTokenizer

from serve.process import ServerProcess
from tiny_checkpoint import random_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALL = '```python\ntool_call(city="Paris")\n```'  # how ChatGLM3 writes a call, and how the server renders one
OBSERVATION = json.dumps({"temperature": 22, "sky": "sunny"})
ANSWER = "It is 22 degrees and sunny in Paris."
NO_TOOLS_ANSWER = "I cannot look up the weather."
BAD_QUESTION = {"role": "user", "content": "Is it raining in Rome?"}
BAD_CALL = "```python\ntool_call(city=Rome)\n```"  # a bare name: not a literal, so not a call
MODEL = "tiny-chatglm3"


def scripts(tokenizer):
    """(prompt ids, reply ids) the model must learn: each ChatGLM3 prompt and the reply to it."""
    tool_turn = {"role": "assistant", "metadata": "get_weather", "content": CALL}
    after_call = [QUESTION, tool_turn, {"role": "observation", "content": OBSERVATION}]
    cases = [
        ([QUESTION], TOOLS, tool_turn, "<|observation|>"),
        (after_call, TOOLS, {"role": "assistant", "metadata": "", "content": ANSWER}, "<|user|>"),
        ([QUESTION], None, {"role": "assistant", "metadata": "", "content": NO_TOOLS_ANSWER}, "<|user|>"),
        ([BAD_QUESTION], TOOLS, {"role": "assistant", "metadata": "get_weather", "content": BAD_CALL}, "<|observation|>"),
    ]
    pairs = []
    for messages, tools, reply, stop in cases:
        prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
        whole = tokenizer.apply_chat_template([*messages, reply], tools=tools, tokenize=True, return_dict=False)
        assert whole[: len(prompt)] == prompt
        pairs.append((prompt, whole[len(prompt) :] + [tokenizer.get_command(stop)]))
    return pairs


def train(model, pairs, steps=1500, lr=1e-2):
    """Fit the reply tokens (teacher forcing) until greedy decoding gives every reply with a margin."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        learned = True
        optimizer.zero_grad()
        for prompt, reply in pairs:
            ids = torch.tensor([prompt + reply])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            target = torch.tensor(reply)
            torch.nn.functional.cross_entropy(logits, target).backward()
            top2 = logits.topk(2, dim=-1)
            margin = logits.gather(1, target[:, None])[:, 0] - torch.where(top2.indices[:, 0] == target, top2.values[:, 1], top2.values[:, 0])
            learned &= bool((margin > 2.0).all())
        if learned:
            break
        optimizer.step()
    assert learned, f"the scripted replies were not learned in {steps} steps"
    return model.eval()


@pytest.fixture(scope="module")
def glm3_model(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp(MODEL) / MODEL
    model = random_model(folder, 2048, add_qkv_bias=True, seq_length=2048, _name_or_path="THUDM/chatglm3-6b")
    shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_format": "chatglm3"}))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait for each other on a busy machine
    try:
        train(model, scripts(tokenizer)).save_pretrained(folder)
    finally:
        torch.set_num_threads(threads)
    stops = [2, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops, "pad_token_id": 0}))
    return folder, tokenizer


@pytest.fixture(scope="module")
def server(glm3_model):
    with ServerProcess("--model-path", glm3_model[0], "--threads", "1") as running:
        yield running
    assert "Traceback" not in running.log, running.log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, messages, **options):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **options)


def test_the_openai_client_drives_a_tool_call_observation_and_answer(client):
    messages = [QUESTION]
    called = ask(client, messages, tools=TOOLS)
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # What an agent loop does: the assistant message as returned, then the tool's result.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": OBSERVATION}]
    answered = ask(client, messages, tools=TOOLS)
    assert answered.choices[0].message.content == ANSWER
    assert answered.choices[0].finish_reason == "stop" and not answered.choices[0].message.tool_calls


def test_a_streamed_tool_call_arrives_as_delta_tool_calls(client):
    chunks = list(ask(client, [QUESTION], tools=TOOLS, stream=True))
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [(call.index, call.function.name, json.loads(call.function.arguments)) for call in calls] == [(0, "get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == ""
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason] == ["tool_calls"]


def test_the_final_answer_streams_as_text(client):
    messages = [
        QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": OBSERVATION},
    ]
    chunks = list(ask(client, messages, tools=TOOLS, stream=True))
    texts = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(texts) == ANSWER and len(texts) > 1


def test_tool_choice_none_offers_no_tools(client):
    answer = ask(client, [QUESTION], tools=TOOLS, tool_choice="none")
    assert answer.choices[0].message.content == NO_TOOLS_ANSWER and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "stop"
    assert ask(client, [QUESTION]).choices[0].message.content == NO_TOOLS_ANSWER  # no tools at all: the same prompt


def test_a_named_tool_choice_opens_the_reply_with_the_function(client, glm3_model):
    tokenizer = glm3_model[1]
    forced = ask(client, [QUESTION], tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.choices[0].finish_reason == "tool_calls"
    assert json.loads(forced.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
    prompt = tokenizer.apply_chat_template([QUESTION], tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    name_line = tokenizer.apply_chat_template(
        [QUESTION, {"role": "assistant", "metadata": "get_weather", "content": ""}], tools=TOOLS, tokenize=True, return_dict=False
    )
    assert name_line[: len(prompt)] == prompt and len(name_line) > len(prompt)
    assert forced.usage.prompt_tokens == len(name_line)


def test_stop_strings_cut_the_answer_not_the_line_that_names_a_tool(client):
    # ChatGLM3 opens each reply with a line naming a tool (empty before an answer): a stop string
    # found there would cut every answer to nothing, or a call to a broken name.
    assert ask(client, [QUESTION], stop=["\n"]).choices[0].message.content == NO_TOOLS_ANSWER
    assert ask(client, [QUESTION], stop=[" look"]).choices[0].message.content == "I cannot"
    called = ask(client, [QUESTION], tools=TOOLS, stop=["weather"]).choices[0]
    assert called.finish_reason == "tool_calls" and called.message.tool_calls[0].function.name == "get_weather"


def test_a_call_that_is_not_a_literal_comes_back_as_text(client):
    answer = ask(client, [BAD_QUESTION], tools=TOOLS)
    assert answer.choices[0].message.content == BAD_CALL and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "send_email"}}}, "send_email"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"name": "get_weather"}]}, "tools[0]"),
        ({"functions": [{"name": "get_weather"}]}, "functions"),
    ],
    ids=["required", "unknown-function", "nameless-tool", "not-a-function-tool", "deprecated-functions"],
)
def test_tool_requests_it_cannot_honour_are_refused_naming_the_field(client, extra, named):
    with pytest.raises(openai.BadRequestError, match=named.replace("[", r"\[").replace("]", r"\]")):
        client.chat.completions.create(model=MODEL, messages=[QUESTION], **extra)


def test_a_history_call_with_bad_arguments_is_refused_naming_it(client):
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}
    messages = [QUESTION, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        ask(client, messages, tools=TOOLS)


def test_history_calls_are_written_so_that_the_tokenizer_reads_them_back(glm3_model):
    import importlib

    from serve.chatglm3 import RequestError, call_text

    parse_tool_call = importlib.import_module(type(glm3_model[1]).__module__).parse_tool_call
    arguments = {"city": "Paris", "days": 2, "metric": True, "note": None, "tags": ["a", 'b"c', "你好\n\\"], "at": {"lat": 48.85, "lon": -2.5e-3}}
    assert parse_tool_call("get_weather", call_text(json.dumps(arguments), "x")) == {"name": "get_weather", "parameters": arguments}
    with pytest.raises(RequestError, match="'class' cannot be a keyword argument"):
        call_text('{"class": 1}', "x")
    with pytest.raises(RequestError, match="JSON object"):
        call_text("[1]", "x")


def test_logprobs_cover_the_answer_not_the_line_naming_a_tool(client, glm3_model):
    tokenizer = glm3_model[1]

    def tokens_of(text, end):
        """The token texts of `text` as ChatGLM3 writes a reply's content, then the turn's end token."""
        return [tokenizer.token_text(token)[0] for token in tokenizer.encode(text, add_special_tokens=False)] + [end]

    # A text answer: its content's tokens and the end of the turn, not the empty first line's.
    answer = ask(client, [QUESTION], logprobs=True, top_logprobs=2)
    assert answer.choices[0].message.content == NO_TOOLS_ANSWER
    content = answer.choices[0].logprobs.content
    assert [entry.token for entry in content] == tokens_of(NO_TOOLS_ANSWER, "<|user|>")
    assert all(entry.logprob == entry.top_logprobs[0].logprob for entry in content)  # greedy
    streamed = ask(client, [QUESTION], logprobs=True, top_logprobs=2, stream=True)
    pieces = [entry for chunk in streamed if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(entry.token, entry.logprob) for entry in pieces] == [(entry.token, entry.logprob) for entry in content]
    # A call that is not a literal comes back as text: the tool's name line is not in it.
    bad = ask(client, [BAD_QUESTION], tools=TOOLS, logprobs=True).choices[0]
    assert bad.message.content == BAD_CALL
    assert [entry.token for entry in bad.logprobs.content] == tokens_of(BAD_CALL, "<|observation|>")
    # A tool call has no content, so no content tokens (serve/README.md: a judgement call).
    called = ask(client, [QUESTION], tools=TOOLS, logprobs=True).choices[0]
    assert called.finish_reason == "tool_calls" and called.logprobs.content == []
    chunks = list(ask(client, [QUESTION], tools=TOOLS, logprobs=True, stream=True))
    assert not [chunk for chunk in chunks if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content]
