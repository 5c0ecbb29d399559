"""The OpenAI request bodies this server accepts, and how a refusal names the field.

Every field the OpenAI API defines for these endpoints is listed: a field this server cannot honour
is refused with a 400 that names it when it is set to anything but its neutral value
(`unsupported_fields`), and a field the API does not define is refused as unrecognized (as the
OpenAI API does), so a client never silently gets something other than what it asked for.
"""

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Closed):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class Message(Closed):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[Any]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None


class Sampling(Closed):
    """Fields common to chat and text completions."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extension: no end of answer before this many tokens (fixed-length answers for load tests).
    min_tokens: int = Field(0, ge=0)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Any = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    modalities: Optional[list[str]] = None
    reasoning_effort: Optional[str] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    best_of: Optional[int] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[str] = None


class EmbeddingRequest(Closed):
    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


# field -> (test that it asks for something this server does not do, why)
_UNSUPPORTED = {
    "frequency_penalty": (lambda v: v not in (None, 0), "penalties are not implemented; leave it unset or 0"),
    "presence_penalty": (lambda v: v not in (None, 0), "penalties are not implemented; leave it unset or 0"),
    "logit_bias": (lambda v: bool(v), "logit_bias is not implemented"),
    "response_format": (
        lambda v: v is not None and v.get("type") != "text",
        "only {\"type\": \"text\"} is supported (no JSON mode)",
    ),
    "modalities": (lambda v: v not in (None, ["text"]), "only text output is supported"),
    "best_of": (lambda v: v not in (None, 1), "best_of is not supported; use n"),
    "suffix": (lambda v: v is not None, "suffix (insertion) is not supported"),
    "dimensions": (lambda v: v is not None, "the vector size is the model's hidden size; leave it unset"),
}


def unsupported_fields(request):
    """(field, reason) of the first field set to something this server does not do, or None."""
    for name, (is_unsupported, why) in _UNSUPPORTED.items():
        if name in type(request).model_fields and is_unsupported(getattr(request, name)):
            return name, why
    return None


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*|function-\w+.*|literal\[.*\])$")


def describe_validation_errors(errors):
    """(message, param) for pydantic/FastAPI validation errors: one line that names the field."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None
    if isinstance(first.get("input"), bytes) and tuple(first.get("loc", ())) == ("body",):
        return "the request body must be JSON, sent with the header 'Content-Type: application/json'", None
    messages, param = [], None
    for error in errors:
        path = ""
        for part in error.get("loc", ()):
            if part == "body" or (isinstance(part, str) and _UNION_TAG.match(part)):
                continue
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        if param is None:
            param = path or None
            where = path or "request body"
        if path == (param or ""):
            text = "unrecognized field" if error.get("type") == "extra_forbidden" else error.get("msg", "invalid")
            if text not in messages:
                messages.append(text)
    value = first.get("input")
    shown = "" if first.get("type") in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {value!r:.60})"
    return f"{where}: {'; or '.join(messages)}{shown}", param
