"""The server's engine on the demo model: a request joins the running batch at the next step, a row's
answer does not depend on what shares the batch, the text is decoded incrementally, and log
probabilities (chat, completions with echo, streamed or not) are the model's own log-softmax."""

import asyncio
import math
import random
import time

import openai
import pytest
import torch

from serve.engine import Engine, IncrementalText, Job, Row, ShuttingDown, prefill_plan
from serve.process import ServerProcess
from test_cli_demo import trained_answer
from tiny_checkpoint import REPO_ROOT

DEMO_MODEL = REPO_ROOT / "demo" / "tiny-chatglm2"
MODEL = "tiny-chatglm2"
CHUNK = 16  # prefill chunk: the demo prompts take two or three


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL, trust_remote_code=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    running = Engine(model, tokenizer, max_batch_size=8, batch_wait=0, prefill_chunk=CHUNK)
    yield running
    running.close()


def chat_ids(tokenizer, query):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def chat_postprocess(tokenizer):
    return lambda text: tokenizer.process_chat_response(text, "", [])[0]


async def answer(engine, rows, postprocess=None, on_submit=None):
    """Submit `rows` as one job; return (job, texts per row, times of the job's deltas and its end)."""
    job = Job(rows, asyncio.get_running_loop(), asyncio.Queue(), postprocess=postprocess)
    engine.submit(job)
    if on_submit:
        on_submit(job)
    texts, streamed, deltas = [""] * len(rows), [""] * len(rows), []
    while True:
        event = await job.events.get()
        if event[0] == "delta":
            streamed[event[1]] += event[2]
            deltas.append(time.monotonic())
        elif event[0] == "finish":
            texts[event[1]] = event[3]
        elif event[0] == "error":
            raise AssertionError(event)
        elif event[0] == "done":
            assert streamed == texts, (streamed, texts)  # the deltas add up to the answer
            return job, texts, deltas, time.monotonic()


def greedy(ids, max_tokens, **fields):
    return Row(list(ids), max_tokens, 0.0, 1.0, 0, **fields)


def test_a_request_submitted_while_another_decodes_starts_at_the_next_step(engine, tokenizer):
    long_ids = tokenizer(tokenizer.build_prompt("Tell me a story"))["input_ids"]
    short_ids = chat_ids(tokenizer, "你好")
    post = chat_postprocess(tokenizer)

    async def together():
        long_rows = [greedy(long_ids, 200, min_tokens=200)]
        running = asyncio.ensure_future(answer(engine, long_rows))
        while long_rows[0].generated < 20:  # the long answer is being decoded
            await asyncio.sleep(0.005)
        seen = {}
        short = await answer(engine, [greedy(short_ids, 64)], post, on_submit=lambda job: seen.setdefault("at_submit", long_rows[0].generated))
        seen["at_short_end"] = long_rows[0].generated
        return await running, short, seen

    (long_job, long_texts, long_deltas, long_end), (short_job, short_texts, short_deltas, short_end), seen = asyncio.run(together())
    assert short_texts == [trained_answer("你好")]
    # The short request took one step per prefill chunk and per token of its own (plus the step
    # running when it came), each also a step of the long answer; it did not wait for the long one.
    steps = seen["at_short_end"] - seen["at_submit"]
    assert steps <= math.ceil(len(short_ids) / CHUNK) + short_job.rows[0].generated + 1, seen
    assert short_end < long_end and long_job.rows[0].generated == 200
    assert any(short_deltas[0] < moment for moment in long_deltas), "the long answer did not go on after the short one joined"
    # Sharing the batch changed neither answer.
    (_, alone, _, _) = asyncio.run(answer(engine, [greedy(long_ids, 200, min_tokens=200)]))
    assert long_texts == alone


def test_seeded_choices_and_stop_strings_do_not_depend_on_what_shares_the_batch(engine, tokenizer):
    ids = chat_ids(tokenizer, "Tell me a story")
    post = chat_postprocess(tokenizer)

    def sampled():
        return [Row(ids, 24, 1.2, 0.9, seed, ("。",)) for seed in (5, 6, 7)]

    (_, alone, _, _) = asyncio.run(answer(engine, sampled(), post))

    async def crowded():
        others = [answer(engine, [greedy(chat_ids(tokenizer, query), 64)], post) for query in ("你好", "Hello", "Who are you?")]
        results = await asyncio.gather(*others[:2], answer(engine, sampled(), post), others[2])
        return results[2][1]

    assert asyncio.run(crowded()) == alone
    assert len(set(alone)) > 1


def test_a_cancelled_job_leaves_the_batch_and_the_others_finish(engine, tokenizer):
    ids = chat_ids(tokenizer, "你好")
    before = engine.stats()["cancelled_rows"]

    async def run():
        doomed = [greedy(ids, 500, min_tokens=500)]
        job = Job(doomed, asyncio.get_running_loop(), asyncio.Queue())
        engine.submit(job)
        while doomed[0].generated < 5:
            await asyncio.sleep(0.005)
        job.cancel()
        kept = await answer(engine, [greedy(ids, 64)], chat_postprocess(tokenizer))
        while (await job.events.get())[0] != "done":
            pass
        return doomed[0], kept[1]

    doomed, kept = asyncio.run(run())
    assert doomed.finish_reason == "cancelled" and doomed.generated < 500
    assert kept == [trained_answer("你好")]
    assert engine.stats()["cancelled_rows"] == before + 1


class PaddingFails:
    """The demo tokenizer, except that padding a batch raises (as a tokenizer without a pad token does)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def pad(self, *args, **kwargs):
        raise ValueError("this tokenizer cannot pad")


class Reading:
    """A prompt being read, as `prefill_plan` sees it."""

    def __init__(self, tokens):
        self.left, self.passed_over = tokens, 0


def read_while_short_prompts_arrive(patience, steps=200):
    """Drive `prefill_plan` step by step: one 10-chunk prompt, and a new 5-token prompt every step.
    The steps in which the long prompt was read, and each short prompt's wait (steps) for its reading."""
    long, reading, long_read, short_waits = Reading(10 * CHUNK), [], [], []
    reading.append(long)
    for step in range(steps):
        short = Reading(5)
        short.arrived = step
        reading.append(short)
        for prompt, size in prefill_plan(reading, CHUNK, patience):
            prompt.left -= size
            if prompt is long:
                long_read.append(step)
            elif not prompt.left:
                short_waits.append(step - prompt.arrived)
        reading = [prompt for prompt in reading if prompt.left]
    return long, long_read, short_waits


def test_a_stream_of_short_prompts_cannot_starve_a_long_one():
    long, long_read, short_waits = read_while_short_prompts_arrive(patience=4)
    assert long.left == 0 and len(long_read) == 10
    # Each chunk of the long prompt waited at most `patience` steps; short prompts still went first otherwise.
    assert all(later - earlier <= 5 for earlier, later in zip([-1, *long_read], long_read)), long_read
    assert max(short_waits) <= 1 and short_waits.count(0) >= len(short_waits) - 10
    # Fewest tokens left first with no bound on the wait (the order before): the long prompt is never read.
    long, long_read, _ = read_while_short_prompts_arrive(patience=10**9)
    assert long_read == [] and long.left == 10 * CHUNK


def test_at_shutdown_a_waiting_job_gets_503_at_once_and_a_running_one_an_error(model, tokenizer):
    closing = Engine(model, tokenizer, max_batch_size=1, batch_wait=0, prefill_chunk=CHUNK)

    async def shut_down():
        loop = asyncio.get_running_loop()
        ids = chat_ids(tokenizer, "你好")
        running = Job([greedy(ids, 900, min_tokens=900)], loop, asyncio.Queue())
        waiting = Job([greedy(ids, 5)], loop, asyncio.Queue())
        closing.submit(running)
        assert (await running.events.get())[0] == "delta"  # it runs, and holds the only row
        closing.submit(waiting)
        closing.refuse_waiting()  # what the server does when it begins to shut down
        event = await asyncio.wait_for(waiting.events.get(), 30)
        assert event[0] == "error" and "shutting down" in event[1] and event[2:] == (503, "server_shutting_down")
        assert not running.rows[0].done  # answered at once, not after the running job
        with pytest.raises(ShuttingDown):
            closing.submit(Job([greedy(ids, 5)], loop, asyncio.Queue()))
        await asyncio.to_thread(closing.close)
        event = await asyncio.wait_for(running.events.get(), 30)
        while event[0] == "delta":
            event = await asyncio.wait_for(running.events.get(), 30)
        assert event[0] == "error" and "shut down" in event[1] and event[2:] == (503, "server_shutting_down")

    asyncio.run(shut_down())


def test_an_embedding_batch_that_fails_anywhere_answers_its_jobs_with_an_error(model, tokenizer):
    failing = Engine(model, PaddingFails(tokenizer), batch_wait=0)

    async def run():
        job = Job([greedy(chat_ids(tokenizer, "你好"), 0)], asyncio.get_running_loop(), asyncio.Queue(), kind="embed")
        failing.submit(job)
        return await asyncio.wait_for(job.events.get(), timeout=30)

    try:
        event = asyncio.run(run())
        assert event[0] == "error" and "embedding" in event[1], event
        # The worker goes on: a generation after the failed batch is answered.
        assert asyncio.run(answer(failing, [greedy(chat_ids(tokenizer, "你好"), 64)], chat_postprocess(tokenizer)))[1] == [trained_answer("你好")]
    finally:
        failing.close()


def test_incremental_text_equals_decoding_the_whole_row(tokenizer):
    texts = ["你好！我是 Tiny ChatGLM2，很高兴见到你。", "Hello  world\n\n  indented\tcode  ", "emoji 😀🎉 ünïcödé ∑", "- item\n```python\nprint(1)\n```"]
    generator = random.Random(0)
    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    sequences += [[generator.randrange(len(tokenizer)) for _ in range(generator.randrange(1, 40))] for _ in range(200)]
    for ids in sequences:
        text = IncrementalText(tokenizer.decode_reply)
        for count, token in enumerate(ids, 1):
            so_far = text.add(token)
            whole = tokenizer.decode_reply(ids[:count])
            # Never ahead of the whole decode; behind it only by a character still incomplete.
            assert whole.startswith(so_far), (ids[:count], so_far, whole)
            assert so_far == whole or whole.endswith("\ufffd"), (ids[:count], so_far, whole)
    assert len(sequences) == 204


def test_incremental_text_after_a_context_is_what_the_tokens_add_to_it(tokenizer):
    # A completion's text continues its prompt: decoded after the prompt's last token, a first piece
    # keeps its word marker ("▁I" after "！" is " I"), where decoded alone it would lose it.
    contexts = [tokenizer(text, add_special_tokens=False)["input_ids"][-1:] for text in ("你好！", "Hello world", "a\n")]
    generator = random.Random(1)
    sequences = [tokenizer.convert_tokens_to_ids(["▁I", "▁am"]), tokenizer("你好！我是", add_special_tokens=False)["input_ids"]]
    sequences += [[generator.randrange(len(tokenizer)) for _ in range(generator.randrange(1, 20))] for _ in range(60)]
    for context in contexts:
        before = tokenizer.decode_reply(context)
        for ids in sequences:
            text = IncrementalText(tokenizer.decode_reply, context)
            for count, token in enumerate(ids, 1):
                so_far = text.add(token)
                whole = tokenizer.decode_reply(context + ids[:count])
                assert whole.startswith(before + so_far), (context, ids[:count], so_far, whole)
                assert before + so_far == whole or whole.endswith("\ufffd"), (context, ids[:count], so_far, whole)
            assert text.whole() == tokenizer.decode_reply(context + ids)[len(before) :]
    assert IncrementalText(tokenizer.decode_reply, contexts[0]).add(sequences[0][0]) == " I"


def reference_logprobs(model, ids):
    """The model's log-softmax at every position of `ids` (one forward, no cache)."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_engine_logprobs_are_the_models_log_softmax(engine, model, tokenizer):
    ids = chat_ids(tokenizer, "Who are you?")
    assert len(ids) > CHUNK  # the prompt's logprobs come from more than one prefill chunk
    (job, _, _, _) = asyncio.run(answer(engine, [Row(ids, 20, 0.0, 1.0, 0, logprobs=5, echo_logprobs=True)]))
    row = job.rows[0]
    generated = [token for token, _, _ in row.token_logprobs]
    assert len(generated) == row.generated and generated[: len(row.tokens)] == row.tokens
    reference = reference_logprobs(model, ids + generated)
    for place, (token, logprob, top) in enumerate(row.prompt_logprobs[1:] + row.token_logprobs, start=1):
        expected = reference[place - 1]
        assert token == (ids + generated)[place]
        assert logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert [other for other, _ in top] == expected.topk(5).indices.tolist()
        assert [value for _, value in top] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
    assert row.prompt_logprobs[0] == (ids[0], None, ())


@pytest.fixture(scope="module")
def client():
    with ServerProcess("--threads", "1", "--max-batch-size", "8") as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert "Traceback" not in server.log, server.log


def test_chat_logprobs_streamed_or_not_are_the_models_log_softmax(client, model, tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert whole.choices[0].message.content == trained_answer("你好")
    assert len(content) == whole.usage.completion_tokens  # every token, the end-of-answer one included
    # Greedy: each token is the likeliest, and its log probability is the model's at that step.
    ids = chat_ids(tokenizer, "你好")
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.bytes == list(entry.token.encode("utf-8")) or entry.token.startswith("<0x")
        expected = reference_logprobs(model, ids)[-1]
        assert entry.logprob == pytest.approx(float(expected.max()), abs=1e-4)
        ids.append(int(expected.argmax()))
    streamed = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    pieces = [entry for chunk in streamed if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(entry.token, entry.logprob) for entry in pieces] == [(entry.token, entry.logprob) for entry in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_echo_scores_the_prompt_as_a_harness_does(client, model, tokenizer):
    # lm-eval's local-completions: the context and a continuation, echo, logprobs=1, max_tokens=1.
    context, continuation = tokenizer.build_prompt("你好"), "你好！我是"
    prompt = context + continuation
    ids = tokenizer(prompt)["input_ids"]
    scored = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text.startswith(prompt) and scored.usage.prompt_tokens == len(ids)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = reference_logprobs(model, ids)
    for place in range(1, len(ids)):
        assert logprobs.token_logprobs[place] == pytest.approx(float(reference[place - 1, ids[place]]), abs=1e-4)
        assert max(logprobs.top_logprobs[place].values()) == pytest.approx(float(reference[place - 1].max()), abs=1e-4)
    assert logprobs.token_logprobs[-1] == pytest.approx(float(reference[-1].max()), abs=1e-4)  # the greedy token
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(value <= max(top.values()) + 1e-6 for value, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]))
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == choice.text
    values = [value for chunk in streamed if chunk.choices[0].logprobs for value in chunk.choices[0].logprobs.token_logprobs]
    assert values == logprobs.token_logprobs
    # lm-eval sends token ids by default: the same ids score the same, the echo is their text.
    by_ids = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0).choices[0]
    assert by_ids.logprobs.token_logprobs == logprobs.token_logprobs
    assert by_ids.text == tokenizer.decode(ids) + choice.text[len(prompt) :]  # the ids' text: their prefix tokens too
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model=MODEL, prompt=[ids, [len(tokenizer)]], max_tokens=1)
    # Without echo: the answer alone, its offsets after the prompt.
    answer_only = client.completions.create(model=MODEL, prompt=context, logprobs=2, max_tokens=3, temperature=0).choices[0]
    assert len(answer_only.logprobs.tokens) == 3 and answer_only.logprobs.text_offset[0] == len(context)
    assert all(len(top) == 2 for top in answer_only.logprobs.top_logprobs)
    echoed = client.completions.create(model=MODEL, prompt=context, echo=True, max_tokens=3, temperature=0).choices[0]
    assert echoed.text == context + answer_only.text and echoed.logprobs is None


def assert_offsets_index_the_text(text, logprobs, unwritten=("</s>",)):
    """Each token's `text_offset` is where its text is in `text` (a piece's word marker may be the
    start of a text, where no space is written); a byte piece's, where its character starts. Tokens
    in `unwritten` have no text there."""
    offsets = logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    for token, offset in zip(logprobs.tokens, offsets):
        if token in unwritten:
            continue
        if token.startswith("<0x"):
            assert offset == len(text) or ord(text[offset]) > 0x7F, (token, offset)
        else:
            assert text[offset:].startswith(token) or text[offset:].startswith(token.removeprefix(" ")), (token, offset, text[offset:])


def test_echo_text_offsets_index_the_returned_text(client, tokenizer):
    prompt = "Hello world, 你好！"  # pieces with and without a word marker, characters of several bytes
    ids = tokenizer(prompt)["input_ids"]
    assert ids[:2] == tokenizer.get_prefix_tokens()
    request = {"model": MODEL, "echo": True, "logprobs": 1, "max_tokens": 5, "temperature": 0}
    choice = client.completions.create(prompt=prompt, **request).choices[0]
    # The user's text, and [gMASK] sop (which it does not hold) placed at its start.
    assert choice.text.startswith(prompt) and len(choice.logprobs.tokens) == len(ids) + 5
    assert choice.logprobs.tokens[:2] == ["[gMASK]", "sop"] and choice.logprobs.text_offset[:3] == [0, 0, 0]
    assert_offsets_index_the_text(choice.text, choice.logprobs, unwritten=("[gMASK]", "sop", "</s>"))
    streamed = [chunk.choices[0] for chunk in client.completions.create(prompt=prompt, stream=True, **request)]
    assert "".join(part.text for part in streamed) == choice.text
    assert [offset for part in streamed if part.logprobs for offset in part.logprobs.text_offset] == choice.logprobs.text_offset
    # Token ids echo as their text, prefix tokens by name: there they have their text.
    by_ids = client.completions.create(prompt=ids, **request).choices[0]
    assert by_ids.text.startswith("[gMASK]sop") and by_ids.logprobs.text_offset[:3] == [0, 7, 10]
    assert_offsets_index_the_text(by_ids.text, by_ids.logprobs)
    # Without echo the answer's offsets count from the prompt's end.
    answer = client.completions.create(prompt=prompt, **{**request, "echo": False}).choices[0]
    assert answer.logprobs.text_offset == choice.logprobs.text_offset[len(ids) :]
    assert_offsets_index_the_text(prompt + answer.text, answer.logprobs)


def test_a_completion_is_what_its_tokens_add_to_the_prompt(client, tokenizer):
    # The demo model answers this prompt with "▁I ▁am": after "！" that is " I am", not "I am", so a
    # client joining prompt and completion gets the text the model wrote. Chat replies stay stripped.
    prompt = "Hello world, 你好！"
    ids = tokenizer(prompt)["input_ids"]
    generated = tokenizer.convert_tokens_to_ids(["▁I", "▁am"])
    expected = tokenizer.decode_reply(ids + generated)[len(tokenizer.decode_reply(ids)) :]
    assert expected == " I am"
    request = {"model": MODEL, "max_tokens": 2, "temperature": 0, "logprobs": 0}
    for sent, sent_text in ((prompt, prompt), (ids, tokenizer.decode(ids))):  # ids: offsets after their text, "[gMASK]sop…"
        choice = client.completions.create(prompt=sent, **request).choices[0]
        assert choice.text == expected and choice.logprobs.tokens == [" I", " am"]
        assert choice.logprobs.text_offset == [len(sent_text), len(sent_text) + 2]
        streamed = [chunk.choices[0] for chunk in client.completions.create(prompt=sent, stream=True, **request)]
        assert "".join(part.text for part in streamed) == expected
    echoed = client.completions.create(prompt=prompt, echo=True, **{**request, "logprobs": 1}).choices[0]
    assert echoed.text == prompt + expected and echoed.logprobs.tokens[-2:] == [" I", " am"]
    assert echoed.logprobs.text_offset[-2:] == [len(prompt), len(prompt) + 2]
    assert_offsets_index_the_text(echoed.text, echoed.logprobs, unwritten=("[gMASK]", "sop"))
    streamed = [chunk.choices[0] for chunk in client.completions.create(prompt=prompt, echo=True, stream=True, **{**request, "logprobs": 1})]
    assert "".join(part.text for part in streamed) == echoed.text
    assert [offset for part in streamed if part.logprobs for offset in part.logprobs.text_offset] == echoed.logprobs.text_offset
    # A stop string is looked for in that text: " I am" cut before "am".
    stopped = {"model": MODEL, "max_tokens": 5, "temperature": 0, "stop": ["am"]}
    assert client.completions.create(prompt=prompt, **stopped).choices[0].text == " I "
    assert "".join(chunk.choices[0].text for chunk in client.completions.create(prompt=prompt, stream=True, **stopped)) == " I "


def test_top_logprobs_need_logprobs(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
