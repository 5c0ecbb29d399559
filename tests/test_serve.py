"""python -m serve, driven by the official `openai` client over loopback: answers, streaming, sampling
parameters, embeddings, and errors that name the problem while the server keeps serving."""

import concurrent.futures
import http.client
import json
import signal
import threading
import time

import openai
import pytest
import torch

from serve.process import ServerProcess, free_port
from test_cli_demo import trained_answer
from tiny_checkpoint import REPO_ROOT

DEMO_MODEL = REPO_ROOT / "demo" / "tiny-chatglm2"
MODEL = "tiny-chatglm2"
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--threads", "1", "--max-batch-size", "8", "--max-body-bytes", BODY_LIMIT) as running:
        yield running
    assert "Traceback" not in running.log, running.log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL, trust_remote_code=True)


def raw_request(server, method, path, body=b"", headers=None):
    """(status, headers, parsed JSON or text) for a request the openai client would not send."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read().decode("utf-8")
    connection.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return response.status, dict(response.getheaders()), data


def still_serving(client):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}], temperature=0)
    assert answer.choices[0].message.content == trained_answer("你好")


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == [MODEL]


def test_chat_answers_the_trained_greeting_with_id_usage_and_finish_reason(client, tokenizer):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}], temperature=0)
    assert answer.choices[0].message.content == trained_answer("你好")
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.id.startswith("chatcmpl-") and abs(answer.created - time.time()) < 600
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True, tokenize=False)
    assert answer.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    answer_tokens = len(tokenizer(trained_answer("你好"), add_special_tokens=False)["input_ids"])
    # The answer's tokens and eos (the model may tokenize its answer differently, never longer by much).
    assert answer_tokens - 2 <= answer.usage.completion_tokens - 1 <= answer_tokens + 2
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_history_goes_through_the_chat_template(client):
    messages = [
        {"role": "user", "content": "My name is Bob."},
        {"role": "assistant", "content": trained_answer("My name is Bob.")},
        {"role": "user", "content": "What is my name?"},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert answer.choices[0].message.content == trained_answer("My name is Bob.", "What is my name?")


def test_stream_sends_role_then_deltas_then_finish_reason_then_usage(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "你好"}],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == trained_answer("你好")
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]) > 1, "not streamed"
    finishing = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert [chunk.choices[0].finish_reason for chunk in finishing] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({chunk.id for chunk in chunks}) == 1


def test_stream_ends_with_done_marker(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "stream": True})
    status, headers, text = raw_request(server, "POST", "/v1/chat/completions", body.encode())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(event)["choices"][0]["delta"].get("content", "") for event in events[:-1]) == trained_answer("Hello")


def test_max_tokens_ends_with_finish_reason_length(client):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}], temperature=0, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3
    assert trained_answer("你好").startswith(answer.choices[0].message.content)


def test_text_parts_developer_role_and_max_completion_tokens(client):
    parts = [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": ""}, {"role": "user", "content": parts}], temperature=0)
    assert answer.choices[0].message.content == trained_answer("你好")
    cut = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}], temperature=0, max_completion_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2


def test_streamed_text_waits_for_whole_characters_stop_strings_and_placeholders():
    from serve.engine import _holdback

    assert _holdback("你好\ufffd\ufffd", (), ()) == 2  # the first bytes of a character
    assert _holdback("Hello wor", ("world",), ()) == 3  # may become a stop string
    assert _holdback("Hello wor", ("xyz",), ()) == 0
    assert _holdback("今年是[[训练", (), (("[[", "]]"),)) == 4  # may become a placeholder
    assert _holdback("[[训练时间]]年", (), (("[[", "]]"),)) == 0


def test_stop_string_cuts_the_answer_before_it(client):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}], temperature=0, stop=["我是"])
    assert answer.choices[0].message.content == trained_answer("你好").split("我是")[0]
    assert answer.choices[0].finish_reason == "stop"


def test_seed_repeats_a_sampled_answer_and_n_gives_several_choices(client):
    def sample(**extra):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], temperature=1.5, top_p=1.0, max_tokens=12, **extra
        )

    first, again = sample(seed=11), sample(seed=11)
    assert first.choices[0].message.content == again.choices[0].message.content
    several = sample(seed=11, n=3)
    assert [choice.index for choice in several.choices] == [0, 1, 2]
    assert several.choices[0].message.content == first.choices[0].message.content
    assert len({choice.message.content for choice in several.choices}) > 1
    assert 3 <= several.usage.completion_tokens <= 3 * 12  # every choice's tokens


def test_min_tokens_holds_off_the_end_of_the_answer(client):
    answer = client.completions.create(model=MODEL, prompt="你好", temperature=0, max_tokens=40, extra_body={"min_tokens": 40})
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 40


def test_completions_take_raw_prompts(client, tokenizer):
    prompts = [tokenizer.build_prompt("你好"), tokenizer.build_prompt("Who are you?")]
    answer = client.completions.create(model=MODEL, prompt=prompts, temperature=0, n=2)
    assert answer.id.startswith("cmpl-")
    assert [choice.index for choice in answer.choices] == [0, 1, 2, 3]
    texts = [choice.text.strip() for choice in answer.choices]
    assert texts == [trained_answer("你好")] * 2 + [trained_answer("Who are you?")] * 2
    assert answer.usage.prompt_tokens == sum(len(tokenizer(prompt)["input_ids"]) for prompt in prompts)
    streamed = client.completions.create(model=MODEL, prompt=prompts[0], temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices).strip() == trained_answer("你好")


def test_embeddings_are_the_normalized_mean_of_the_final_hidden_states(client, tokenizer):
    from transformers import AutoModel

    texts = ["你好", "Hello, how are you today?"]
    answer = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    as_floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    vectors = torch.tensor([item.embedding for item in answer.data])
    assert torch.allclose(vectors, torch.tensor([item.embedding for item in as_floats.data]))
    model = AutoModel.from_pretrained(DEMO_MODEL, trust_remote_code=True).eval()
    with torch.no_grad():
        for text, vector in zip(texts, vectors):
            hidden = model.transformer(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]
            assert torch.allclose(vector, torch.nn.functional.normalize(hidden.mean(0), dim=0), atol=1e-5)
    assert answer.usage.prompt_tokens == sum(len(tokenizer(text)["input_ids"]) for text in texts)


@pytest.mark.parametrize(
    "body, status, named",
    [
        (b'{"model": "tiny-chatglm2", "messages": [', 400, "not valid JSON"),
        (b'["not", "an", "object"]', 400, "request body"),
        (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "gpt-4"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode(), 400, "max_tokens"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages[0].content"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "colour": 1}).encode(), 400, "colour"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}).encode(), 400, "top_logprobs"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}).encode(), 400, "presence_penalty"),
        (json.dumps({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400, "messages"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}).encode(), 400, "tools"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 9}).encode(), 400, "n"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}).encode(), 400, "stop"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}).encode(), 400, "5000"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(), 400, "messages[0].content[0]"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 5}).encode(), 400, "max_completion_tokens"),
    ],
    ids=[
        "bad-json", "not-an-object", "unknown-model", "negative-max-tokens", "wrong-type", "wrong-content-type",
        "no-messages", "unknown-field", "too-many-top-logprobs", "unsupported-penalty", "bad-role-order", "tools-on-chatglm2",
        "n-over-batch", "empty-stop", "max-tokens-over-context", "image-part", "two-length-limits",
    ],
)  # fmt: skip
def test_bad_requests_get_a_status_and_a_message_naming_the_problem(server, client, body, status, named):
    got, _, answer = raw_request(server, "POST", "/v1/chat/completions", body)
    assert got == status, answer
    message = answer["error"]["message"]
    assert named in message and "Traceback" not in message, message
    still_serving(client)


def test_a_body_not_sent_as_json_is_refused_with_the_header_to_use(server, client):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, answer = raw_request(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "Content-Type: application/json" in answer["error"]["message"]
    still_serving(client)


def test_the_openai_client_sees_the_error_message(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_a_prompt_longer_than_the_context_is_refused_with_both_numbers(server, client, tokenizer):
    prompt = "你好 " * 1200
    length = len(tokenizer(prompt)["input_ids"])
    assert length >= 1024
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert str(length) in str(refused.value) and "1024" in str(refused.value)
    still_serving(client)


def test_an_oversized_body_is_refused_with_413(server, client):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}).encode()
    status, _, answer = raw_request(server, "POST", "/v1/chat/completions", body)
    assert status == 413 and str(BODY_LIMIT) in answer["error"]["message"]
    still_serving(client)


@pytest.mark.parametrize("path", ["/v1/models", "/", "/health"])
def test_a_dns_rebinding_host_is_refused_and_loopback_names_are_served(server, path):
    # A page at evil.example whose name rebinds to 127.0.0.1 sends its own name as the Host.
    status, _, answer = raw_request(server, "GET", path, headers={"Host": f"evil.example:{server.port}"})
    assert status == 403 and "'evil.example:" in answer["error"]["message"], answer
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"[::1]:{server.port}", "LOCALHOST"):
        status, _, answer = raw_request(server, "GET", path, headers={"Host": host})
        assert status == 200, (host, answer)


def test_a_chat_from_a_rebound_host_never_reaches_the_model(server, client):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "你好"}]}).encode()
    status, _, answer = raw_request(server, "POST", "/v1/chat/completions", body, {"Host": "evil.example"})
    assert status == 403 and "evil.example" in answer["error"]["message"]
    still_serving(client)


def test_cross_origin_requests_get_no_cors_permission(server):
    # A page from elsewhere may not read answers: no preflight approval, no Access-Control-* headers.
    origin = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = raw_request(server, "OPTIONS", "/v1/chat/completions", headers=origin)
    assert status != 200 and not [name for name in headers if name.lower().startswith("access-control-")], headers
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 1}).encode()
    status, headers, _ = raw_request(server, "POST", "/v1/chat/completions", body, {"Origin": "http://evil.example"})
    assert not [name for name in headers if name.lower().startswith("access-control-")], headers


def test_a_host_header_counts_as_loopback_only_when_it_is_a_loopback_name_and_a_port():
    from serve.__main__ import LOOPBACK_HOSTS
    from serve.app import host_name

    assert [host_name(header) for header in ("[::1]:8000", "LocalHost:80", "127.0.0.1", "::1")] == ["::1", "localhost", "127.0.0.1", "::1"]
    # Text after the name that is no port must not be dropped to leave a loopback name.
    for header in ("localhost:8000@evil.example", "[::1]evil.example", "localhost:80:80", "localhost:", "[::1"):
        assert host_name(header) not in LOOPBACK_HOSTS, header


def test_allowed_hosts_widen_the_loopback_names_or_allow_any():
    from serve.__main__ import LOOPBACK_HOSTS, allowed_hosts

    assert allowed_hosts("127.0.0.1") == LOOPBACK_HOSTS
    assert allowed_hosts("::1", ["Chat.Example", " [fe80::1] "]) == LOOPBACK_HOSTS | {"chat.example", "fe80::1"}
    # A name given with its port matches the Host headers that carry that port (the check drops ports).
    assert allowed_hosts("127.0.0.1", ["chat.example:8000", "[fe80::1]:8000"]) == LOOPBACK_HOSTS | {"chat.example", "fe80::1"}
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    # Bound to another address, the operator chose to be reachable: any Host, unless names are given.
    assert allowed_hosts("0.0.0.0") is None
    assert allowed_hosts("192.168.1.5", ["chat.example"]) == LOOPBACK_HOSTS | {"chat.example", "192.168.1.5"}


def test_the_server_does_not_import_the_demo():
    import subprocess
    import sys

    code = "import sys, serve.__main__, serve.app; print(sorted(name for name in sys.modules if name.split('.')[0] == 'demo'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def metrics(server):
    """{sample name with labels: value} of GET /metrics, after checking every sample has its TYPE."""
    status, headers, text = raw_request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4"), text
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.split("{")[0].removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") in typed, line
            samples[name] = float(value)
    return samples


def test_metrics_count_requests_tokens_and_latencies_in_prometheus_text(server, client):
    before = metrics(server)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}], temperature=0)
    after = metrics(server)

    def grew(name):
        return after[name] - before.get(name, 0)

    assert grew("serve_requests_total") == 1
    assert grew("serve_prompt_tokens_total") == answer.usage.prompt_tokens
    assert grew("serve_generation_tokens_total") == answer.usage.completion_tokens
    assert grew('serve_http_responses_total{path="/v1/chat/completions",status="200"}') == 1
    assert after["serve_queue_depth"] == 0 and {"serve_running_rows", "serve_prefilling_rows", "serve_decoding_rows"} <= set(after)
    assert grew("serve_time_to_first_token_seconds_count") == 1
    assert grew("serve_time_per_output_token_seconds_count") == answer.usage.completion_tokens - 1
    for histogram in ("serve_time_to_first_token_seconds", "serve_time_per_output_token_seconds"):
        buckets = [value for name, value in after.items() if name.startswith(histogram + "_bucket")]
        assert buckets == sorted(buckets) and after[histogram + '_bucket{le="+Inf"}'] == after[histogram + "_count"]
        assert after[histogram + "_sum"] > 0


def test_unknown_endpoint_and_method_get_json_errors(server):
    status, _, answer = raw_request(server, "GET", "/v1/nothing")
    assert status == 404 and "/v1/nothing" in answer["error"]["message"]
    status, _, answer = raw_request(server, "GET", "/v1/chat/completions")
    assert status == 405 and "GET" in answer["error"]["message"]


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting-for-the-whole-answer"])
def test_a_client_that_leaves_frees_its_row(server, client, stream):
    before = server.health()["cancelled_rows"]
    body = json.dumps({"model": MODEL, "prompt": "你好", "max_tokens": 1000, "min_tokens": 1000, "temperature": 0, "stream": stream})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200
        response.read1(64)  # the stream has started
    else:
        deadline = time.monotonic() + 60
        while server.health()["running_rows"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # until the answer is being generated
    connection.sock.shutdown(2)
    connection.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = server.health()
        if health["cancelled_rows"] > before and health["running_rows"] == 0:
            break
        time.sleep(0.2)
    assert health["cancelled_rows"] > before and health["running_rows"] == 0, health
    still_serving(client)


class GatedTokenizer:
    """The demo tokenizer, except that tokenizing a text longer than `size` characters waits until
    `release` is set (or 30 s pass), as tokenizing a prompt of megabytes takes seconds."""

    def __init__(self, tokenizer, size):
        self.tokenizer, self.size = tokenizer, size
        self.big_started, self.release = threading.Event(), threading.Event()
        self.released_in_time = None

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, *args, **kwargs):
        if isinstance(text, str) and len(text) > self.size:
            self.big_started.set()
            self.released_in_time = self.release.wait(timeout=30)
        return self.tokenizer(text, *args, **kwargs)


def test_a_huge_prompt_being_tokenized_does_not_hold_up_a_small_request(tokenizer):
    import uvicorn
    from transformers import AutoModel

    from serve.app import Settings, create_app
    from serve.engine import Engine

    model = AutoModel.from_pretrained(DEMO_MODEL, trust_remote_code=True).eval()
    gated = GatedTokenizer(tokenizer, size=100_000)
    engine = Engine(model, tokenizer)
    settings = Settings(model_name=MODEL, context_length=model.config.seq_length, max_body_bytes=8 * 1024 * 1024)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, gated, settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        local = type("Local", (), {"port": port})
        huge = json.dumps({"model": MODEL, "prompt": "你好 " * 500_000, "max_tokens": 5}, ensure_ascii=False).encode()  # 3.5 MB
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            big = pool.submit(raw_request, local, "POST", "/v1/completions", huge)
            assert gated.big_started.wait(60), big.result() if big.done() else "the huge prompt never reached the tokenizer"
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
            small = client.completions.create(model=MODEL, prompt=tokenizer.build_prompt("你好"), temperature=0)
            gated.release.set()
            status, _, answer = big.result()
        # The small answer arrived while the huge prompt was still being tokenized (not after the 30 s).
        assert gated.released_in_time is True
        assert small.choices[0].text.strip() == trained_answer("你好")
        assert status == 400 and "context" in answer["error"]["message"]
    finally:
        gated.release.set()
        server.should_exit = True
        thread.join(30)
        engine.close()


def test_requests_that_arrive_together_are_decoded_in_one_batch(server, client):
    queries = ["你好", "Who are you?", "Hello", "What can you do?"]
    before = server.health()["batches"]
    with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
        answers = list(
            pool.map(
                lambda query: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": query}], temperature=0),
                queries,
            )
        )
    assert [answer.choices[0].message.content for answer in answers] == [trained_answer(query) for query in queries]
    assert server.health()["batches"] - before < len(queries)


def test_a_full_queue_answers_429_with_retry_after_and_an_api_key_is_enforced():
    # One row per batch, one waiting request, and a long batch window: requests sent together overflow.
    arguments = ("--threads", "1", "--max-batch-size", "1", "--max-waiting", "1", "--batch-wait-ms", "500", "--api-key", "sesame")
    with ServerProcess(*arguments, "--allowed-hosts", "chat.example") as busy:
        # --allowed-hosts adds names; others are still refused, before the key is looked at.
        status, _, _ = raw_request(busy, "GET", "/health", headers={"Host": "chat.example:8000"})
        assert status == 200
        status, _, answer = raw_request(busy, "GET", "/v1/models", headers={"Host": "evil.example"})
        assert status == 403 and "evil.example" in answer["error"]["message"]
        status, _, answer = raw_request(busy, "GET", "/v1/models")
        assert status == 401 and "Authorization: Bearer" in answer["error"]["message"]
        status, _, _ = raw_request(busy, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        client = openai.OpenAI(base_url=f"{busy.url}/v1", api_key="sesame", max_retries=0, timeout=120)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "你好"}], "temperature": 0}).encode()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: raw_request(busy, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer sesame"}), range(6)))
        statuses = sorted(status for status, _, _ in results)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
        for status, headers, answer in results:
            if status == 429:
                assert headers["retry-after"] == "1" and "busy" in answer["error"]["message"]
            else:
                assert answer["choices"][0]["message"]["content"] == trained_answer("你好")
        still_serving(client)
    assert "Traceback" not in busy.log
    access = [json.loads(line) for line in busy.log.splitlines() if line.startswith('{"time"')]
    assert {entry["status"] for entry in access} >= {200, 401, 429}
    assert all(entry["request_id"] and entry["duration_ms"] >= 0 for entry in access)


def test_requests_waiting_at_shutdown_are_answered_503_at_once():
    # One row: a long streamed answer runs while two requests wait; then the server is stopped (Ctrl-C).
    with ServerProcess("--threads", "1", "--max-batch-size", "1", "--batch-wait-ms", "0") as closing:
        running = http.client.HTTPConnection("127.0.0.1", closing.port, timeout=60)
        long_answer = {"model": MODEL, "prompt": "你好", "max_tokens": 1000, "min_tokens": 1000, "temperature": 0, "stream": True}
        running.request("POST", "/v1/completions", body=json.dumps(long_answer), headers={"Content-Type": "application/json"})
        response = running.getresponse()
        assert response.status == 200
        response.read1(64)  # the long answer is being generated
        short = {"model": MODEL, "prompt": "你好", "max_tokens": 5, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            whole = pool.submit(raw_request, closing, "POST", "/v1/completions", json.dumps(short).encode())
            streamed = pool.submit(raw_request, closing, "POST", "/v1/completions", json.dumps({**short, "stream": True}).encode())
            deadline = time.monotonic() + 60
            while closing.health()["waiting"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert closing.health()["waiting"] == 2
            closing.process.send_signal(signal.SIGINT)
            # Answered while the long answer still runs (uvicorn waits up to 5 s for it), not dropped after.
            status, _, answer = whole.result(timeout=60)
            assert status == 503, answer
            assert "shutting down" in answer["error"]["message"] and answer["error"]["code"] == "server_shutting_down"
            status, _, events = streamed.result(timeout=60)
            assert status == 200 and "data: [DONE]" not in events
            error = json.loads(events.split("data: ", 1)[1])["error"]
            assert "shutting down" in error["message"] and error["code"] == "server_shutting_down"
        running.close()  # the long answer's client leaves: its row ends, and so does the shutdown
        assert closing.process.wait(timeout=60) == 0
    assert "Traceback" not in closing.log, closing.log
