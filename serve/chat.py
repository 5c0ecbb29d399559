"""POST /v1/chat/completions: a conversation rendered by the tokenizer's chat template (ChatGLM2's,
or ChatGLM3's with its tools), answered as text or, on ChatGLM3, as a tool call."""

import asyncio
import time
import uuid

import anyio.to_thread
import jinja2
from fastapi import APIRouter, Request

from . import chatglm3
from .engine import IncrementalText
from .logprobs import chat_logprobs
from .protocol import ChatRequest
from .serving import APIError, client_left, serving_of

router = APIRouter()


class ReplyEvents(asyncio.Queue):
    """A ChatGLM3 chat job's events as the client gets them. The engine sends the raw reply, whose
    first line is ChatGLM3's metadata (a tool's name, or empty before text): deltas become those of
    the visible text, and a finished reply that calls a tool becomes ("tool_call", row, call) and
    ("finish", row, "tool_calls", "", []). `prefix` is a reply's opening already in the prompt (a
    named `tool_choice`).

    Log probabilities cover the answer's tokens, as OpenAI's cover a message's content: those after
    the first line (its tokens are no text of the message), and the end-of-answer token (one of
    `end_ids`); none for a tool call, which has no content. They wait for the text they belong to;
    `logprobs[row]` holds them all."""

    def __init__(self, tokenizer, tools, end_ids, prefix=""):
        super().__init__()
        self.tokenizer, self.tools, self.end_ids, self.prefix = tokenizer, tools, end_ids, prefix
        self.raw, self.shown, self.pending, self.tool_calls, self.logprobs = {}, {}, {}, {}, {}
        self.first_lines = {}  # row -> the reply's text so far while its first line is open

    def put_nowait(self, event):
        if event[0] not in ("delta", "finish"):
            return super().put_nowait(event)
        index = event[1]
        entries = self._answer_entries(index, event[-1])
        self.pending[index] = [*self.pending.get(index, ()), *entries]
        self.logprobs[index] = [*self.logprobs.get(index, ()), *entries]
        if event[0] == "delta":
            self.raw[index] = self.raw.get(index, self.prefix) + event[2]
            return self._show(index, chatglm3.visible_text(self.raw[index]))
        reason, reply = event[2], event[3]
        text, call = chatglm3.tool_call_of(self.tokenizer, self.prefix + reply, self.tools)
        if call is not None:
            self.tool_calls[index] = call
            super().put_nowait(("tool_call", index, call))
            text, reason = "", "tool_calls"
            self.pending[index], self.logprobs[index] = [], []
        else:
            self._show(index, text)
        super().put_nowait(("finish", index, reason, text, self.pending.pop(index, [])))

    def _answer_entries(self, index, entries):
        """Of a row's next log-probability entries, those of the answer: not the tokens of the
        reply's first line up to its newline (a token that goes on past the newline is the answer's)."""
        if "\n" in self.prefix:
            return list(entries)
        kept = []
        for entry in entries:
            line = self.first_lines.setdefault(index, IncrementalText(self.tokenizer.decode_reply))
            if line is None or entry[0] in self.end_ids:
                kept.append(entry)
                continue
            text = line.add(entry[0])
            newline = text.find("\n")
            if newline >= 0:
                self.first_lines[index] = None  # the line is closed: every later token is the answer's
                if newline + 1 < len(text):
                    kept.append(entry)
        return kept

    def answer_start(self, reply):
        """`Job.answer_start` for the engine's text of a reply, which lacks `prefix`."""
        start = chatglm3.answer_start(self.prefix + reply)
        return None if start is None else start - len(self.prefix)

    def _show(self, index, text):
        sent = self.shown.get(index, "")
        if text.startswith(sent) and len(text) > len(sent):
            self.shown[index] = text
            super().put_nowait(("delta", index, text[len(sent) :], self.pending.pop(index, [])))


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


def chat_messages(body, model_name):
    """The request's messages as the ChatGLM2 chat template takes them. ChatGLM2 has no tool
    calling: `tools`/`functions` and `tool` messages are refused here."""
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if getattr(body, name) not in (None, [], "none"):
            raise APIError(400, f"{name}: the model '{model_name}' (ChatGLM2) has no tool calling; remove '{name}'", param=name)
    messages = []
    for index, message in enumerate(body.messages):
        where = f"messages[{index}]"
        if message.role in ("tool", "function") or message.tool_calls:
            raise APIError(400, f"{where}: tool messages and tool_calls need a model with tool calling; this one (ChatGLM2) has none", param=where)
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": message_text(message, where)})
    return messages


def chat_request(body, tokenizer, model_name, end_ids):
    """(messages, tools, events, forced function) for the chat template: ChatGLM2's messages, or
    ChatGLM3's (`chatglm3.conversation`) with the tools offered (none with tool_choice "none")
    and the job's ReplyEvents (`end_ids`: the engine's end-of-answer tokens)."""
    if getattr(tokenizer, "chat_format", "chatglm2") != "chatglm3":
        return chat_messages(body, model_name), None, None, None
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
    events = ReplyEvents(tokenizer, tools, end_ids, prefix=f"{forced}\n" if forced else "")
    return messages, tools or None, events, forced


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    serving = serving_of(request)
    tokenizer, model_name = serving.tokenizer, serving.settings.model_name
    serving.check_model(body.model)
    serving.check_supported(body)
    messages, tools, events, forced = chat_request(body, tokenizer, model_name, serving.engine.eos_ids)
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
    prompt_ids = serving.check_length(list(encoding["input_ids"]), "messages")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise APIError(400, "max_completion_tokens: give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    limit_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    rows = serving.rows_for(body, [prompt_ids], max_tokens, limit_name)
    answer_start = events.answer_start if events is not None else None
    job = serving.submit(rows, postprocess=serving.chat_postprocess, events=events, answer_start=answer_start)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index, text=None, finish_reason=None, role=None, logprobs=(), tool_call=None):
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name, "choices": []}
            if index is not None:
                delta = {"role": role, "content": ""} if role else ({"content": text} if text is not None else {})
                if tool_call is not None:
                    delta = {"tool_calls": [{"index": 0, **tool_call}]}
                shown = chat_logprobs(serving.text_of, logprobs) if logprobs else None
                payload["choices"] = [{"index": index, "delta": delta, "logprobs": shown, "finish_reason": finish_reason}]
            if include_usage:
                payload["usage"] = None
            return payload

        firsts = [chunk(index, role="assistant") for index in range(len(job.rows))]
        return serving.stream(job, request, len(prompt_ids), include_usage, chunk, firsts)
    texts = await serving.gather(job, request)
    if texts is None:
        return client_left()
    calls = events.tool_calls if events is not None else {}
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": None, "tool_calls": [calls[index]]}
            if index in calls
            else {"role": "assistant", "content": text},
            "logprobs": None if row.logprobs is None else chat_logprobs(serving.text_of, row.token_logprobs if events is None else events.logprobs[index]),
            "finish_reason": "tool_calls" if index in calls else row.finish_reason,
        }
        for index, (row, text) in enumerate(zip(job.rows, texts))
    ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model_name,
        "choices": choices,
        "usage": serving.usage_of(job, len(prompt_ids), request),
    }
