"""What every endpoint shares: `Serving` (the engine, the tokenizer and the settings, with the checks
and the job handling of a request) and `APIError`, the OpenAI error answer. The routers (chat.py,
completions.py, embeddings.py, status.py, page.py) reach the app's `Serving` with `serving_of(request)`."""

import asyncio
import json
import time

import anyio.to_thread
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Busy, Job, Row, ShuttingDown
from .logprobs import requested_logprobs, token_texts
from .protocol import unsupported_fields


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error):
    return JSONResponse(error_body(error.message, error.kind, error.param, error.code), error.status, headers=error.headers)


def client_left():
    return JSONResponse(error_body("the client closed the connection"), 499)


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def serving_of(request):
    """The `Serving` of the app answering `request`."""
    return request.app.state.serving


class Serving:
    """The engine, the tokenizer and the settings a request is answered with; `responses` counts the
    HTTP responses by (path, status) for /metrics."""

    def __init__(self, engine, tokenizer, settings, chat_postprocess=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.chat_postprocess = chat_postprocess
        self.text_of = token_texts(tokenizer)  # a token's text in log probabilities
        self.responses = {}
        self.created = int(time.time())

    def model_card(self):
        settings = self.settings
        return {"id": settings.model_name, "object": "model", "created": self.created, "owned_by": "local", "context_length": settings.context_length}

    def check_model(self, name):
        if name != self.settings.model_name:
            raise APIError(404, f"the model '{name}' does not exist on this server; it serves '{self.settings.model_name}'", param="model", code="model_not_found")

    @staticmethod
    def check_supported(request):
        refused = unsupported_fields(request)
        if refused:
            raise APIError(400, f"{refused[0]}: {refused[1]}", param=refused[0])

    async def encode(self, text, param):
        # Tokenizing megabytes takes seconds: off the event loop, so other requests keep flowing.
        ids = await anyio.to_thread.run_sync(lambda: self.tokenizer(text)["input_ids"])
        return self.check_length(ids, param)

    def token_ids(self, ids, param):
        if not ids or not all(0 <= token < len(self.tokenizer) for token in ids):
            raise APIError(400, f"{param}: token ids must be a non-empty list of ids from 0 to {len(self.tokenizer) - 1}", param=param)
        return list(ids)

    def check_length(self, ids, param):
        context_length = self.settings.context_length
        if len(ids) >= context_length:
            raise APIError(
                400,
                f"{param}: the prompt has {len(ids)} tokens and the model's context is {context_length} tokens, "
                "which leaves no room for an answer; shorten it",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def new_tokens_for(self, prompt_ids, max_tokens, param):
        settings = self.settings
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

    def rows_for(self, request, prompts, max_tokens, param, continues_prompt=False):
        """The engine's rows for a chat or text completion request: `n` per prompt, each with its seed;
        `continues_prompt` for a text completion, whose text is what its tokens add to the prompt's."""
        settings, max_batch_size = self.settings, self.engine.max_batch_size
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop")
        count = len(prompts) * request.n
        if count > max_batch_size:
            raise APIError(
                400,
                f"n: {len(prompts)} prompt(s) x n={request.n} asks for {count} sequences; this server decodes at most "
                f"{max_batch_size} at once (--max-batch-size)",
                param="n",
            )
        if max_tokens is not None and request.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens: {request.min_tokens} is more than {param}={max_tokens}", param="min_tokens")
        temperature = settings.temperature if request.temperature is None else request.temperature
        top_p = settings.top_p if request.top_p is None else request.top_p
        seed = self.engine.new_seed() if request.seed is None else request.seed % 2**63
        try:
            logprobs = requested_logprobs(request)
        except ValueError as error:
            raise APIError(400, str(error), param="top_logprobs") from None
        rows = []
        for ids in prompts:
            new_tokens = self.new_tokens_for(ids, max_tokens, param)
            for choice in range(request.n):
                rows.append(
                    Row(ids, new_tokens, temperature, top_p, (seed + choice) % 2**63, tuple(stops), min(request.min_tokens, new_tokens), continues_prompt=continues_prompt, **logprobs)
                )
        return rows

    def submit(self, rows, kind="generate", postprocess=None, events=None, answer_start=None):
        job = Job(rows, asyncio.get_running_loop(), events or asyncio.Queue(), postprocess=postprocess, kind=kind, answer_start=answer_start)
        try:
            self.engine.submit(job)
        except Busy as busy:
            retry_after_s = self.settings.retry_after_s
            raise APIError(
                429,
                f"the server is busy: {busy}; retry after {retry_after_s} s",
                code="server_busy",
                kind="rate_limit_error",
                headers={"Retry-After": str(retry_after_s)},
            ) from None
        except ShuttingDown as closing:
            raise APIError(503, f"{closing}; send the request again later", code="server_shutting_down", kind="server_error") from None
        return job

    async def next_event(self, job, request, checked):
        """The job's next event; cancels the job and returns None if the client went away.
        `checked` holds when the connection was last looked at (at most every disconnect_poll_s)."""
        poll_s = self.settings.disconnect_poll_s
        while True:
            if time.monotonic() - checked[0] >= poll_s:
                checked[0] = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    return None
            try:
                return await asyncio.wait_for(job.events.get(), timeout=poll_s)
            except asyncio.TimeoutError:
                continue

    async def gather(self, job, request):
        """Wait for the whole job; the finished texts per row, or None if the client left."""
        texts = [""] * len(job.rows)
        checked = [time.monotonic()]
        while True:
            event = await self.next_event(job, request, checked)
            if event is None:
                return None
            if event[0] == "finish":
                texts[event[1]] = event[3]
            elif event[0] == "error":
                _, message, status, code = event
                raise APIError(status, f"{message} (request id {request.state.request_id})", code=code, kind="server_error")
            elif event[0] == "done":
                return texts

    @staticmethod
    def usage_of(job, prompt_tokens, request):
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(row.generated for row in job.rows),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        request.state.usage = usage
        return usage

    def stream(self, job, request, prompt_tokens, include_usage, chunk, first_chunks):
        """SSE: `first_chunks`, one chunk per delta and per finish, the usage chunk if asked, [DONE];
        an engine error (a failed step, the server shutting down) ends it with an `{"error": ...}` event."""

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
                        _, message, _, code = event
                        yield sse(error_body(f"{message} (request id {request.state.request_id})", "server_error", code=code))
                        return
                    elif event[0] == "done":
                        break
                if include_usage:
                    final = chunk(None)
                    final["usage"] = self.usage_of(job, prompt_tokens, request)
                    yield sse(final)
                else:
                    self.usage_of(job, prompt_tokens, request)
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a no-op once every row has finished; frees the rows if the client left

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
