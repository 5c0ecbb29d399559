"""The chat surface of spec §5: chat, stream_chat (and its cache continuation), stream_generate, guards."""

import inspect
import shutil
import sys
import threading

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, LogitsProcessor, TextIteratorStreamer

from tiny_checkpoint import random_model


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("chat-model")
    shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    vocab = -(-tokenizer.vocab_size // 64) * 64
    random_model(folder, vocab, add_qkv_bias=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(chat_folder):
    return AutoTokenizer.from_pretrained(chat_folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def model(chat_folder):
    return AutoModel.from_pretrained(chat_folder, trust_remote_code=True).eval()


HISTORY = [("你好", "你好，我是助手。"), ("What is 2+2?", "4")]


def greedy_response(model, tokenizer, input_ids, max_new_tokens, **kwargs):
    output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    new_tokens = output[0, input_ids.shape[1] :].tolist()
    return new_tokens, tokenizer.decode(new_tokens, skip_special_tokens=True)


def assert_stream_final(streamed, complete):
    """stream_chat never yields text ending in an incomplete character, so its last text may stop short."""
    if complete.endswith("\ufffd"):
        assert complete.startswith(streamed)
    else:
        assert streamed == complete


def test_chat_and_stream_chat_signatures_follow_the_published_defaults(model):
    chat = inspect.signature(model.chat).parameters
    assert [(n, p.default) for n, p in chat.items() if p.default is not inspect.Parameter.empty] == [
        ("history", None),
        ("max_length", 8192),
        ("num_beams", 1),
        ("do_sample", True),
        ("top_p", 0.8),
        ("temperature", 0.8),
        ("logits_processor", None),
        ("role", "user"),  # ChatGLM3's; last, so that ChatGLM2's positional order holds
    ]
    stream = inspect.signature(model.stream_chat).parameters
    assert [(n, p.default) for n, p in stream.items() if p.default is not inspect.Parameter.empty] == [
        ("history", None),
        ("past_key_values", None),
        ("max_length", 8192),
        ("do_sample", True),
        ("top_p", 0.8),
        ("temperature", 0.8),
        ("logits_processor", None),
        ("return_past_key_values", False),
        ("role", "user"),
    ]


def test_chat_answers_the_built_prompt_and_appends_the_turn(model, tokenizer):
    response, history = model.chat(tokenizer, "今天天气如何？", history=list(HISTORY), do_sample=False, max_new_tokens=8)
    prompt = tokenizer([tokenizer.build_prompt("今天天气如何？", HISTORY)], return_tensors="pt")
    _, expected = greedy_response(model, tokenizer, prompt["input_ids"], 8)
    assert response == expected.strip().replace("[[训练时间]]", "2023年")
    assert history == HISTORY + [("今天天气如何？", response)]


def test_stream_chat_grows_to_the_chat_response(model, tokenizer):
    expected, _ = model.chat(tokenizer, "hello", do_sample=False, max_length=40)
    partials = [response for response, _ in model.stream_chat(tokenizer, "hello", do_sample=False, max_length=40)]
    assert len(partials) > 1 and all(later.startswith(earlier) for earlier, later in zip(partials, partials[1:]))
    assert_stream_final(partials[-1], expected)
    assert all(not text.endswith("\ufffd") for text in partials)


class ForcedReply(LogitsProcessor):
    """Makes the model answer `ids`, one per step."""

    def __init__(self, ids):
        self.ids, self.prompt_length = list(ids), None

    def __call__(self, input_ids, scores):
        self.prompt_length = self.prompt_length or input_ids.shape[1]
        forced = torch.full_like(scores, -1e4)
        forced[:, self.ids[min(input_ids.shape[1] - self.prompt_length, len(self.ids) - 1)]] = 0
        return forced


def test_stream_chat_yields_each_new_text_once_and_never_an_empty_first_one(model, tokenizer):
    """As the published loop: a first token that decodes to nothing (the word-start piece alone) yields
    nothing, and the stop token, which adds no text, does not yield the final text again."""
    space = tokenizer.convert_tokens_to_ids("\u2581")
    assert space != tokenizer.unk_token_id and tokenizer.decode([space]) == ""
    words = tokenizer.encode("good day", add_special_tokens=False)
    reply = [space] + words + [tokenizer.eos_token_id]
    partials = [
        response
        for response, _ in model.stream_chat(tokenizer, "hi", do_sample=False, logits_processor=[ForcedReply(reply)])
    ]
    response, _ = model.chat(tokenizer, "hi", do_sample=False, logits_processor=[ForcedReply(reply)])
    assert response == "good day"
    expected = []
    for end in range(2, len(reply)):
        text = tokenizer.decode(reply[:end], skip_special_tokens=True).strip()
        if text != (expected[-1] if expected else ""):
            expected.append(text)
    assert partials == expected and expected[0] != "" and expected[-1] == response


def test_stream_chat_continues_from_the_returned_cache(model, tokenizer):
    history = []
    *_, (first, history, cache) = model.stream_chat(
        tokenizer, "你好", history, do_sample=False, max_length=30, return_past_key_values=True
    )
    first_prompt = tokenizer([tokenizer.build_prompt("你好", [])], return_tensors="pt")["input_ids"]
    first_tokens, _ = greedy_response(model, tokenizer, first_prompt, 30 - first_prompt.shape[1])
    first_tokens = [t for t in first_tokens if t != tokenizer.eos_token_id]
    assert cache.get_seq_length() == first_prompt.shape[1] + len(first_tokens)

    *_, (second, history, cache) = model.stream_chat(
        tokenizer, "再见", history, past_key_values=cache, do_sample=False, max_length=60, return_past_key_values=True
    )
    round_ids = tokenizer.build_chat_input("再见", history[:1], continuation=True)
    full = torch.cat((first_prompt, torch.tensor([first_tokens]), round_ids["input_ids"]), dim=1)
    _, expected = greedy_response(model, tokenizer, full, 60 - full.shape[1])
    assert_stream_final(second, expected.strip())
    assert [turn[0] for turn in history] == ["你好", "再见"]


def test_stream_generate_yields_growing_sequences_and_stops_at_max_new_tokens(model, tokenizer):
    inputs = tokenizer(["hello"], return_tensors="pt")
    steps = list(model.stream_generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=[]))
    assert [s.shape[1] for s in steps] == [inputs["input_ids"].shape[1] + n for n in range(1, 6)]
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(steps[-1], generated)


def test_stream_generate_ends_before_the_stop_token_so_its_decoded_text_is_the_reply(model, tokenizer):
    """FastChat's generate_stream_chatglm decodes what stream_generate yields with transformers' default
    (special tokens kept); the stop token that ended generation is not yielded, so its text is chat's
    reply, not the reply followed by "</s>"."""
    words = tokenizer.encode("good day", add_special_tokens=False)
    reply = words + [tokenizer.eos_token_id]
    inputs = tokenizer([tokenizer.build_prompt("hi")], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    steps = list(model.stream_generate(**inputs, do_sample=False, max_new_tokens=8, logits_processor=[ForcedReply(reply)]))
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=8, logits_processor=[ForcedReply(reply)])
    assert generated[0, prompt_length:].tolist() == reply
    assert [step.shape[1] - prompt_length for step in steps] == list(range(1, len(words) + 1))
    assert torch.equal(steps[-1], generated[:, :-1])
    assert tokenizer.decode(steps[-1][0, prompt_length:].tolist()) == "good day"
    response, _ = model.chat(tokenizer, "hi", do_sample=False, logits_processor=[ForcedReply(reply)])
    assert response == "good day"


def test_stream_generate_yields_a_stop_token_that_generation_went_past(model, tokenizer):
    """A generation_config without the model's stop ids generates past `</s>`: every step is yielded."""
    from transformers import GenerationConfig

    reply = tokenizer.encode("good", add_special_tokens=False) + [tokenizer.eos_token_id] * 3
    inputs = tokenizer([tokenizer.build_prompt("hi")], return_tensors="pt")
    assert model.generation_config.eos_token_id in (tokenizer.eos_token_id, [tokenizer.eos_token_id])
    config = GenerationConfig(do_sample=False, max_new_tokens=len(reply), eos_token_id=[], pad_token_id=0)
    steps = list(model.stream_generate(**inputs, generation_config=config, logits_processor=[ForcedReply(reply)]))
    assert steps[-1][0, inputs["input_ids"].shape[1] :].tolist() == reply
    assert len(steps) == len(reply)


def test_text_iterator_streamer_streams_generate(model, tokenizer):
    inputs = tokenizer(["hello"], return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    kwargs = dict(**inputs, max_new_tokens=6, do_sample=False, streamer=streamer)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert streamed == tokenizer.decode(output[0, inputs["input_ids"].shape[1] :].tolist())


def modeling_module(model):
    return sys.modules[type(model).__module__]


def test_process_chat_response_strips_fills_the_training_date_and_appends_the_turn(tokenizer):
    response, history = tokenizer.process_chat_response("  截至[[训练时间]]。\n", "何时？", [("a", "b")])
    assert response == "截至2023年。"
    assert history == [("a", "b"), ("何时？", "截至2023年。")]


def test_chat_and_stream_chat_take_every_generate_keyword(model, tokenizer):
    prompt = tokenizer([tokenizer.build_prompt("hello")], return_tensors="pt")["input_ids"]
    plain_tokens, plain = greedy_response(model, tokenizer, prompt, 12)
    changed = False
    for keywords in ({"repetition_penalty": 3.0}, {"no_repeat_ngram_size": 1}, {"bad_words_ids": [plain_tokens[:1]]}):
        _, expected = greedy_response(model, tokenizer, prompt, 12, **keywords)
        changed |= expected != plain
        response, _ = model.chat(tokenizer, "hello", max_new_tokens=12, do_sample=False, **keywords)
        assert response == expected.strip()
        *_, (streamed, _) = model.stream_chat(tokenizer, "hello", max_new_tokens=12, do_sample=False, **keywords)
        assert_stream_final(streamed, expected.strip())
    assert changed, "no keyword changed the greedy answer, so the test shows nothing"


def test_closing_a_stream_early_stops_generating_and_ends_its_thread(model, tokenizer, monkeypatch):
    lengths = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        output = generate(*args, **kwargs)
        lengths.append(output.shape[1])
        return output

    monkeypatch.setattr(model, "generate", recording_generate)
    before = threading.active_count()
    prompt_length = tokenizer.build_chat_input("hello")["input_ids"].shape[1]
    stream = model.stream_chat(tokenizer, "hello", max_new_tokens=200, min_new_tokens=200, do_sample=False)
    next(stream)
    stream.close()
    assert threading.active_count() == before
    assert lengths and lengths[0] < prompt_length + 200


def test_errors_inside_streamed_generation_reach_the_caller(model, tokenizer):
    with pytest.raises(ValueError, match="no_such_argument"):
        next(model.stream_chat(tokenizer, "hello", max_new_tokens=5, no_such_argument=1))


def test_invalid_scores_become_a_finite_distribution(model):
    inf = float("inf")
    scores = torch.tensor(
        [
            [0.0, float("nan"), 1.0, 0.0, 2.0, 3.0, 4.0],
            [0.0, 1.0, inf, 0.0, 2.0, 3.0, 4.0],
            [-inf] * 7,
            [0.0, -inf, 1.0, -inf, 2.0, 3.0, 4.0],
        ]
    )
    fixed = modeling_module(model).InvalidScoreLogitsProcessor()(None, scores.clone())
    assert torch.isfinite(fixed[:3]).all() and fixed[:3].argmax(-1).tolist() == [5, 5, 5]
    assert torch.equal(fixed[3], scores[3]), "a banned token's -inf is a valid score and must stay"


def test_min_new_tokens_bans_eos_without_derailing_the_answer(model, tokenizer):
    """min_new_tokens sets eos to -inf; the published invalid-score guard then replaced every step by token 5."""
    prompt = tokenizer([tokenizer.build_prompt("hello")], return_tensors="pt")["input_ids"]
    tokens, _ = greedy_response(model, tokenizer, prompt, 6, min_new_tokens=6)
    response, _ = model.chat(tokenizer, "hello", do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert response == tokenizer.decode(tokens).strip()
    assert tokens.count(5) < len(tokens)


@pytest.mark.parametrize(
    "query,history,error,match",
    [
        (42, None, TypeError, "query"),
        ("hi", "not a list", TypeError, "history"),
        ("hi", [("only one",)], ValueError, r"history\[0\]"),
        ("hi", [("q", 3)], ValueError, r"history\[0\]"),
    ],
)
def test_chat_rejects_malformed_arguments(model, tokenizer, query, history, error, match):
    with pytest.raises(error, match=match):
        model.chat(tokenizer, query, history)
    with pytest.raises(error, match=match):
        next(model.stream_chat(tokenizer, query, history))


def test_prompt_longer_than_seq_length_is_refused_before_any_compute(model, tokenizer, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model, "generate", no_compute)
    monkeypatch.setattr(model, "forward", no_compute)
    long_query = "hello world " * model.config.seq_length
    with pytest.raises(ValueError, match="seq_length"):
        model.chat(tokenizer, long_query)
    with pytest.raises(ValueError, match="seq_length"):
        next(model.stream_chat(tokenizer, long_query))
