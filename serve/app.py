"""The FastAPI application: the routers of the OpenAI-compatible endpoints (chat.py, completions.py,
embeddings.py, status.py) and of the web chat page (page.py) over one `Serving`, and the gate every
request passes (Host check, API key, body size limit, request id, structured access log)."""

import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import chat, completions, embeddings, page, status
from .protocol import describe_validation_errors
from .serving import APIError, Serving, error_response

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


class Server(uvicorn.Server):
    """uvicorn's server, which answers the requests still waiting for the engine (503) as soon as it
    begins to shut down: uvicorn then waits for the running ones (its graceful shutdown), and a
    waiting one would otherwise wait with them, be admitted after them, or be cut off unanswered."""

    def __init__(self, config, engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None):
        self.engine.refuse_waiting()
        await super().shutdown(sockets=sockets)


def create_app(engine, tokenizer, settings, chat_postprocess=None):
    """The application serving `engine`'s model under `settings.model_name`."""
    app = FastAPI(title="ChatGLM OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = Serving(engine, tokenizer, settings, chat_postprocess)
    for family in (status, page, chat, completions, embeddings):
        app.include_router(family.router)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(Gate, settings=settings, responses=app.state.serving.responses)
    return app


async def api_error(request, error):
    return error_response(error)


async def invalid_request(request, error):
    message, param = describe_validation_errors(error.errors())
    return error_response(APIError(400, message, param=param))


async def http_error(request, error):
    message = {404: f"no such endpoint: {request.method} {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}
    return error_response(APIError(error.status_code, message.get(error.status_code, str(error.detail)), headers=dict(error.headers or {})))


async def internal_error(request, error):
    log.exception("request %s failed", request.state.request_id)
    return error_response(APIError(500, f"internal server error (request id {request.state.request_id}; details are in the server log)", kind="server_error"))
