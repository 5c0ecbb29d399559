"""The FastAPI application: OpenAI-compatible endpoints over an `Engine`, the web chat page, and the
gate every request passes (API key, body size limit, request id, structured access log)."""

import asyncio
import base64
import hmac
import json
import logging
import re
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import anyio.to_thread
import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import chatglm3
from .engine import Busy, Job, Row
from .logprobs import CompletionChoices, chat_logprobs, requested_logprobs, token_texts
from .protocol import ChatRequest, CompletionRequest, EmbeddingRequest, describe_validation_errors, unsupported_fields

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"chat.js": "text/javascript; charset=utf-8", "markdown.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}
# The page runs only its own scripts and talks only to this server: even text that got past the
# renderer as markup could run no script and load nothing (no images, frames, fonts, other hosts).
PAGE_POLICY = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
access_log = logging.getLogger("serve.access")
log = logging.getLogger("serve")


@dataclass
class Settings:
    model_name: str
    context_length: int
    max_tokens_default: int = 512
    temperature: float = 0.8
    top_p: float = 0.8
    api_key: Optional[str] = None
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_s: int = 1
    disconnect_poll_s: float = 0.25
    # Host header names accepted (lower case, no port); None accepts any (serve/__main__.py's `allowed_hosts`).
    allowed_hosts: Optional[frozenset] = None


# A Host header: a name or a bracketed IPv6 address, then perhaps a port.
HOST_HEADER = re.compile(r"\[(?P<address>[^\]]*)\](?::\d+)?|(?P<name>[^:\[\]]*)(?::\d+)?")


def host_name(header):
    """The name in a Host header without its port: "[::1]:8000" -> "::1", "Example:80" -> "example";
    a header that is not a name and a port comes back whole, so that it matches no allowed name."""
    header = header.strip().lower()
    match = HOST_HEADER.fullmatch(header)
    if match is None:
        return header
    return match["address"] if match["address"] is not None else match["name"]


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error):
    return JSONResponse(error_body(error.message, error.kind, error.param, error.code), error.status, headers=error.headers)


# The paths /metrics counts requests of by name; any other is counted as "other".
COUNTED_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class Gate:
    """ASGI middleware: request id, Host check, API key, body size limit, one JSON access-log line
    and a count in `responses` ((path, status) -> number, for /metrics) per request."""

    def __init__(self, app, settings, responses):
        self.app = app
        self.settings = settings
        self.responses = responses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = {}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await self._read_body(scope, receive)
                receive = self._replay(body, receive)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            counted = (scope["path"] if scope["path"] in COUNTED_PATHS else "other", status.get("code"))
            self.responses[counted] = self.responses.get(counted, 0) + 1
            usage = state.get("usage") or {}
            access_log.info(
                json.dumps(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "request_id": request_id,
                        "client": (scope.get("client") or ("-",))[0],
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status.get("code"),
                        "duration_ms": round((time.monotonic() - started) * 1000, 1),
                        "prompt_tokens": usage.get("prompt_tokens"),
                        "completion_tokens": usage.get("completion_tokens"),
                    }
                )
            )

    def _refusal(self, scope):
        allowed = self.settings.allowed_hosts
        if allowed is not None:
            host = dict(scope.get("headers") or []).get(b"host")
            if host is not None and host_name(host.decode("latin-1")) not in allowed:
                shown = host.decode("latin-1")[:100]
                return APIError(
                    403,
                    f"Host {shown!r} is not served here (it may be a DNS-rebinding page); allowed: "
                    f"{', '.join(sorted(allowed))} (--allowed-hosts adds names)",
                    code="host_not_allowed",
                    kind="permission_error",
                )
        key = self.settings.api_key
        if key is None or not scope["path"].startswith("/v1/"):
            return None
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), key.encode()):
            return None
        return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key", kind="authentication_error")

    async def _read_body(self, scope, receive):
        limit = self.settings.max_body_bytes
        too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)", code="request_too_large")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", too_big
            if not message.get("more_body"):
                break
        return b"".join(chunks), None

    @staticmethod
    def _replay(body, receive):
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


class ReplyEvents(asyncio.Queue):
    """A ChatGLM3 chat job's events as the client gets them. The engine sends the raw reply, whose
    first line is ChatGLM3's metadata (a tool's name, or empty before text): deltas become those of
    the visible text (log probabilities wait for the text they belong to), and a finished reply that
    calls a tool becomes ("tool_call", row, call) and ("finish", row, "tool_calls", "", logprobs).
    `prefix` is a reply's opening already in the prompt (a named `tool_choice`)."""

    def __init__(self, tokenizer, tools, prefix=""):
        super().__init__()
        self.tokenizer, self.tools, self.prefix = tokenizer, tools, prefix
        self.raw, self.shown, self.pending, self.tool_calls = {}, {}, {}, {}

    def put_nowait(self, event):
        if event[0] not in ("delta", "finish"):
            return super().put_nowait(event)
        index = event[1]
        self.pending[index] = [*self.pending.get(index, ()), *event[-1]]
        if event[0] == "delta":
            self.raw[index] = self.raw.get(index, self.prefix) + event[2]
            return self._show(index, chatglm3.visible_text(self.raw[index]))
        reason, reply = event[2], event[3]
        text, call = chatglm3.tool_call_of(self.tokenizer, self.prefix + reply, self.tools)
        if call is not None:
            self.tool_calls[index] = call
            super().put_nowait(("tool_call", index, call))
            text, reason = "", "tool_calls"
        else:
            self._show(index, text)
        super().put_nowait(("finish", index, reason, text, self.pending.pop(index, [])))

    def answer_start(self, reply):
        """`Job.answer_start` for the engine's text of a reply, which lacks `prefix`."""
        start = chatglm3.answer_start(self.prefix + reply)
        return None if start is None else start - len(self.prefix)

    def _show(self, index, text):
        sent = self.shown.get(index, "")
        if text.startswith(sent) and len(text) > len(sent):
            self.shown[index] = text
            super().put_nowait(("delta", index, text[len(sent) :], self.pending.pop(index, [])))


def prometheus_text(stats, histograms, responses):
    """The Prometheus text exposition (version 0.0.4) of the engine's `stats()` and `histograms()` and
    the HTTP responses counted by the Gate."""
    lines = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}" for labels, value in samples)

    metric("serve_http_responses_total", "counter", "HTTP responses by path and status.", [
        (f'{{path="{path}",status="{code}"}}', count) for (path, code), count in sorted(responses.items(), key=str)
    ])  # fmt: skip
    for name, key, kind, help_text in (
        ("serve_requests_total", "requests", "counter", "Generation and embedding requests admitted to the engine."),
        ("serve_prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens read (prefilled)."),
        ("serve_generation_tokens_total", "generated_tokens", "counter", "Tokens generated, end-of-answer tokens included."),
        ("serve_cancelled_rows_total", "cancelled_rows", "counter", "Rows dropped because their client went away."),
        ("serve_steps_total", "steps", "counter", "Engine steps (prefill chunks and decoding steps)."),
        ("serve_queue_depth", "waiting", "gauge", "Requests waiting to be admitted."),
        ("serve_running_rows", "running_rows", "gauge", "Rows being prefilled or decoded."),
        ("serve_prefilling_rows", "prefilling_rows", "gauge", "Rows whose prompt is being read."),
        ("serve_decoding_rows", "decoding_rows", "gauge", "Rows in the decoding batch."),
    ):
        metric(name, kind, help_text, [("", stats[key])])
    for name, key, help_text in (
        ("serve_time_to_first_token_seconds", "ttft_seconds", "From a request's submission to its first token."),
        ("serve_time_per_output_token_seconds", "time_per_output_token_seconds", "Between two tokens of a row."),
    ):
        histogram = histograms[key]
        buckets = [(f'{{le="{"+Inf" if bound == float("inf") else f"{bound:g}"}"}}', count) for bound, count in histogram["buckets"]]
        metric(name, "histogram", help_text, [])
        lines.extend(f"{name}_bucket{labels} {count}" for labels, count in buckets)
        lines.extend([f"{name}_sum {histogram['sum']:.6f}", f"{name}_count {histogram['count']}"])
    return "\n".join(lines) + "\n"


def create_app(engine, tokenizer, settings, chat_postprocess=None):
    """The application serving `engine`'s model under `settings.model_name`."""
    app = FastAPI(title="ChatGLM OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    text_of = token_texts(tokenizer)  # a token's text in log probabilities

    @app.exception_handler(APIError)
    async def api_error(request, error):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error):
        message, param = describe_validation_errors(error.errors())
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        message = {404: f"no such endpoint: {request.method} {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}
        return error_response(APIError(error.status_code, message.get(error.status_code, str(error.detail)), headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request, error):
        log.exception("request %s failed", request.state.request_id)
        return error_response(APIError(500, f"internal server error (request id {request.state.request_id}; details are in the server log)", kind="server_error"))

    def check_model(name):
        if name != settings.model_name:
            raise APIError(404, f"the model '{name}' does not exist on this server; it serves '{settings.model_name}'", param="model", code="model_not_found")

    def check_supported(request):
        refused = unsupported_fields(request)
        if refused:
            raise APIError(400, f"{refused[0]}: {refused[1]}", param=refused[0])

    async def encode(text, param):
        # Tokenizing megabytes takes seconds: off the event loop, so other requests keep flowing.
        ids = await anyio.to_thread.run_sync(lambda: tokenizer(text)["input_ids"])
        return check_length(ids, param)

    def token_ids(ids, param):
        if not ids or not all(0 <= token < len(tokenizer) for token in ids):
            raise APIError(400, f"{param}: token ids must be a non-empty list of ids from 0 to {len(tokenizer) - 1}", param=param)
        return list(ids)

    def check_length(ids, param):
        if len(ids) >= settings.context_length:
            raise APIError(
                400,
                f"{param}: the prompt has {len(ids)} tokens and the model's context is {settings.context_length} tokens, "
                "which leaves no room for an answer; shorten it",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def new_tokens_for(prompt_ids, max_tokens, param):
        room = settings.context_length - len(prompt_ids)
        if max_tokens is None:
            return min(settings.max_tokens_default, room)
        if max_tokens > room:
            raise APIError(
                400,
                f"{param}={max_tokens} does not fit: the prompt has {len(prompt_ids)} tokens and the model's context is "
                f"{settings.context_length} tokens, which leaves {room}",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def rows_for(request, prompts, max_tokens, param):
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop")
        count = len(prompts) * request.n
        if count > engine.max_batch_size:
            raise APIError(
                400,
                f"n: {len(prompts)} prompt(s) x n={request.n} asks for {count} sequences; this server decodes at most "
                f"{engine.max_batch_size} at once (--max-batch-size)",
                param="n",
            )
        if max_tokens is not None and request.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens: {request.min_tokens} is more than {param}={max_tokens}", param="min_tokens")
        temperature = settings.temperature if request.temperature is None else request.temperature
        top_p = settings.top_p if request.top_p is None else request.top_p
        seed = engine.new_seed() if request.seed is None else request.seed % 2**63
        try:
            logprobs = requested_logprobs(request)
        except ValueError as error:
            raise APIError(400, str(error), param="top_logprobs") from None
        rows = []
        for ids in prompts:
            new_tokens = new_tokens_for(ids, max_tokens, param)
            for choice in range(request.n):
                rows.append(Row(ids, new_tokens, temperature, top_p, (seed + choice) % 2**63, tuple(stops), min(request.min_tokens, new_tokens), **logprobs))
        return rows

    def submit(rows, kind="generate", postprocess=None, events=None):
        answer_start = events.answer_start if isinstance(events, ReplyEvents) else None
        job = Job(rows, asyncio.get_running_loop(), events or asyncio.Queue(), postprocess=postprocess, kind=kind, answer_start=answer_start)
        try:
            engine.submit(job)
        except Busy as busy:
            raise APIError(
                429,
                f"the server is busy: {busy}; retry after {settings.retry_after_s} s",
                code="server_busy",
                kind="rate_limit_error",
                headers={"Retry-After": str(settings.retry_after_s)},
            ) from None
        return job

    async def next_event(job, request, checked):
        """The job's next event; cancels the job and returns None if the client went away.
        `checked` holds when the connection was last looked at (at most every disconnect_poll_s)."""
        while True:
            if time.monotonic() - checked[0] >= settings.disconnect_poll_s:
                checked[0] = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    return None
            try:
                return await asyncio.wait_for(job.events.get(), timeout=settings.disconnect_poll_s)
            except asyncio.TimeoutError:
                continue

    async def gather(job, request):
        """Wait for the whole job; the finished texts per row, or None if the client left."""
        texts = [""] * len(job.rows)
        checked = [time.monotonic()]
        while True:
            event = await next_event(job, request, checked)
            if event is None:
                return None
            if event[0] == "finish":
                texts[event[1]] = event[3]
            elif event[0] == "error":
                raise APIError(500, f"{event[1]} (request id {request.state.request_id})", kind="server_error")
            elif event[0] == "done":
                return texts

    def usage_of(job, prompt_tokens, request):
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(row.generated for row in job.rows),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        request.state.usage = usage
        return usage

    def sse(payload):
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def stream(job, request, prompt_tokens, include_usage, chunk, first_chunks):
        """SSE: `first_chunks`, one chunk per delta and per finish, the usage chunk if asked, [DONE]."""

        async def events():
            try:
                for payload in first_chunks:
                    yield sse(payload)
                while True:
                    event = await job.events.get()
                    if event[0] == "delta":
                        yield sse(chunk(event[1], text=event[2], logprobs=event[3]))
                    elif event[0] == "tool_call":
                        yield sse(chunk(event[1], tool_call=event[2]))
                    elif event[0] == "finish":
                        yield sse(chunk(event[1], finish_reason=event[2], logprobs=event[4]))
                    elif event[0] == "error":
                        yield sse(error_body(f"{event[1]} (request id {request.state.request_id})", "server_error"))
                        return
                    elif event[0] == "done":
                        break
                if include_usage:
                    final = chunk(None)
                    final["usage"] = usage_of(job, prompt_tokens, request)
                    yield sse(final)
                else:
                    usage_of(job, prompt_tokens, request)
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a no-op once every row has finished; frees the rows if the client left

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def message_text(message, where):
        content = message.content
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"{where}.content[{part_index}]: only text parts are supported, got type '{part.type}'", param=f"{where}.content")
            content = "".join(part.text for part in content)
        if content is None:
            raise APIError(400, f"{where}.content: a {message.role} message needs text content", param=f"{where}.content")
        return content

    def chat_messages(body):
        """The request's messages as the ChatGLM2 chat template takes them. ChatGLM2 has no tool
        calling: `tools`/`functions` and `tool` messages are refused here."""
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if getattr(body, name) not in (None, [], "none"):
                raise APIError(400, f"{name}: the model '{settings.model_name}' (ChatGLM2) has no tool calling; remove '{name}'", param=name)
        messages = []
        for index, message in enumerate(body.messages):
            where = f"messages[{index}]"
            if message.role in ("tool", "function") or message.tool_calls:
                raise APIError(400, f"{where}: tool messages and tool_calls need a model with tool calling; this one (ChatGLM2) has none", param=where)
            messages.append({"role": "system" if message.role == "developer" else message.role, "content": message_text(message, where)})
        return messages

    def chat_request(body):
        """(messages, tools, events, forced function) for the chat template: ChatGLM2's messages, or
        ChatGLM3's (`chatglm3.conversation`) with the tools offered (none with tool_choice "none")
        and the job's ReplyEvents."""
        if getattr(tokenizer, "chat_format", "chatglm2") != "chatglm3":
            return chat_messages(body), None, None, None
        for name in ("functions", "function_call"):
            if getattr(body, name) is not None:
                raise APIError(400, f"{name}: the deprecated functions API is not supported; use tools and tool_choice", param=name)
        try:
            tools = chatglm3.tool_schemas(body.tools or [])
            forced = chatglm3.forced_function(body.tool_choice, tools)
            messages = chatglm3.conversation(body.messages, message_text)
        except chatglm3.RequestError as error:
            raise APIError(400, str(error), param=error.param) from None
        if body.tool_choice == "none":
            tools = []
        events = ReplyEvents(tokenizer, tools, prefix=f"{forced}\n" if forced else "")
        return messages, tools or None, events, forced

    responses = {}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.stats(), engine.histograms(), responses), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, **engine.stats()}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in STATIC_FILES:
            raise StarletteHTTPException(404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return model_card()

    def model_card():
        return {"id": settings.model_name, "object": "model", "created": settings_created, "owned_by": "local", "context_length": settings.context_length}

    settings_created = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        messages, tools, events, forced = chat_request(body)
        if forced:  # the reply opens with the named function's line, as ChatGLM3 writes a call
            messages = [*messages, {"role": "assistant", "metadata": forced, "content": ""}]
        try:
            # The tokenizer renders and encodes the chat (prefix tokens included, as `chat` does), off
            # the event loop like `encode`.
            encoding = await anyio.to_thread.run_sync(
                lambda: tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=not forced, tokenize=True, return_dict=True)
            )
        except (ValueError, TypeError, jinja2.TemplateError) as error:
            raise APIError(400, f"messages: {error}", param="messages") from None
        prompt_ids = check_length(list(encoding["input_ids"]), "messages")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "max_completion_tokens: give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        limit_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = submit(rows_for(body, [prompt_ids], max_tokens, limit_name), postprocess=chat_postprocess, events=events)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index, text=None, finish_reason=None, role=None, logprobs=(), tool_call=None):
                payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": settings.model_name, "choices": []}
                if index is not None:
                    delta = {"role": role, "content": ""} if role else ({"content": text} if text is not None else {})
                    if tool_call is not None:
                        delta = {"tool_calls": [{"index": 0, **tool_call}]}
                    shown = chat_logprobs(text_of, logprobs) if logprobs else None
                    payload["choices"] = [{"index": index, "delta": delta, "logprobs": shown, "finish_reason": finish_reason}]
                if include_usage:
                    payload["usage"] = None
                return payload

            firsts = [chunk(index, role="assistant") for index in range(len(job.rows))]
            return stream(job, request, len(prompt_ids), include_usage, chunk, firsts)
        texts = await gather(job, request)
        if texts is None:
            return JSONResponse(error_body("the client closed the connection"), 499)
        calls = events.tool_calls if events is not None else {}
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": None, "tool_calls": [calls[index]]}
                if index in calls
                else {"role": "assistant", "content": text},
                "logprobs": None if row.logprobs is None else chat_logprobs(text_of, row.token_logprobs),
                "finish_reason": "tool_calls" if index in calls else row.finish_reason,
            }
            for index, (row, text) in enumerate(zip(job.rows, texts))
        ]
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": settings.model_name,
            "choices": choices,
            "usage": usage_of(job, len(prompt_ids), request),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        # A prompt is a string or token ids (as harnesses send them: used as given, no prefix added).
        single = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        prompts = [body.prompt] if single else body.prompt
        if not prompts:
            raise APIError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        encoded = []
        for index, prompt in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            encoded.append(await encode(prompt, name) if isinstance(prompt, str) else check_length(token_ids(prompt, name), name))
        job = submit(rows_for(body, encoded, body.max_tokens, "max_tokens"))
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(ids) for ids in encoded)
        prompt_texts = [prompt if isinstance(prompt, str) else tokenizer.decode(prompt) for prompt in prompts]
        shown = CompletionChoices(text_of, job.rows, prompt_texts, body.n, body.echo)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index, text=None, finish_reason=None, logprobs=()):
                payload = {"id": completion_id, "object": "text_completion", "created": created, "model": settings.model_name, "choices": []}
                if index is not None:
                    text, logprobs = shown.streamed(index, text, logprobs)
                    payload["choices"] = [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]
                if include_usage:
                    payload["usage"] = None
                return payload

            return stream(job, request, prompt_tokens, include_usage, chunk, [])
        texts = await gather(job, request)
        if texts is None:
            return JSONResponse(error_body("the client closed the connection"), 499)
        choices = []
        for index, (row, text) in enumerate(zip(job.rows, texts)):
            text, logprobs = shown.whole(index, text)
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": row.finish_reason})
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": settings.model_name,
            "choices": choices,
            "usage": usage_of(job, prompt_tokens, request),
        }

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs or len(inputs) > engine.max_batch_size:
            raise APIError(400, f"input: give 1 to {engine.max_batch_size} strings (--max-batch-size), got {len(inputs)}", param="input")
        encoded = [await encode(text, "input" if len(inputs) == 1 else f"input[{index}]") for index, text in enumerate(inputs)]
        job = submit([Row(ids, 0, 0.0, 1.0, 0) for ids in encoded], kind="embed")
        if await gather(job, request) is None:
            return JSONResponse(error_body("the client closed the connection"), 499)
        data = []
        for index, vector in enumerate(job.result):
            if body.encoding_format == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        prompt_tokens = sum(len(ids) for ids in encoded)
        request.state.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
        return {"object": "list", "data": data, "model": settings.model_name, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

    app.add_middleware(Gate, settings=settings, responses=responses)
    return app
