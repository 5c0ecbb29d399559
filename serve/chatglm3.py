"""ChatGLM3 through the OpenAI chat API: OpenAI messages and `tools` in, text or one tool call out.

The tokenizer owns the prompt (its `apply_chat_template` puts the tools in the system message) and
reads a reply (`process_chat_response`, whose `parse_tool_call` never runs model output). This
module only maps the OpenAI shapes onto ChatGLM3's messages and back:

- `system`/`developer` -> system, `user` -> user, `assistant` text -> assistant with empty metadata,
  each of an assistant's `tool_calls` -> an assistant turn with the function's name as metadata and
  the call written as ChatGLM3 writes it (```python\\ntool_call(city="Paris")\\n```), `tool` ->
  observation;
- a reply whose first line names a tool and whose body is a literal `tool_call(...)` becomes
  `tool_calls` with `finish_reason: "tool_calls"`; anything else is text.
"""

import json
import keyword
import uuid

FENCE = "```python\n{}\n```"


class RequestError(ValueError):
    """A request ChatGLM3 cannot take; `param` names the field."""

    def __init__(self, param, message):
        super().__init__(f"{param}: {message}")
        self.param = param


def python_literal(value):
    """`value` (decoded JSON) as the Python literal ChatGLM3 writes in a call; JSON strings are Python strings."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(item) for item in value) + "]"
    return "{" + ", ".join(f"{python_literal(key)}: {python_literal(item)}" for key, item in value.items()) + "}"


def call_text(arguments, where):
    """The body of an assistant turn calling a tool with `arguments` (a JSON object as a string)."""
    try:
        parameters = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise RequestError(where, f"not valid JSON: {arguments!r:.60}") from None
    if not isinstance(parameters, dict):
        raise RequestError(where, "must be a JSON object of keyword arguments")
    for name in parameters:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise RequestError(where, f"{name!r} cannot be a keyword argument of a ChatGLM3 tool call")
    return FENCE.format("tool_call(" + ", ".join(f"{name}={python_literal(value)}" for name, value in parameters.items()) + ")")


def tool_schemas(tools):
    """The request's `tools`, checked: each `{"type": "function", "function": {"name": ..., ...}}`."""
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise RequestError(f"tools[{index}]", 'give {"type": "function", "function": {"name": ..., "parameters": ...}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"tools[{index}].function.name", "a tool needs a name")
    return list(tools)


def forced_function(tool_choice, tools):
    """None, or the function `tool_choice` names. "none"/"auto" are taken; ChatGLM3 cannot be made to call
    some tool ("required"), but a named one can: its name opens the reply, as the model writes it."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        raise RequestError("tool_choice", "'required' cannot be enforced on ChatGLM3; use 'auto', 'none' or name a function")
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise RequestError("tool_choice", 'give "none", "auto" or {"type": "function", "function": {"name": ...}}')
    if name not in [tool["function"]["name"] for tool in tools or []]:
        raise RequestError("tool_choice", f"the function {name!r} is not in tools")
    return name


def conversation(messages, text_of):
    """ChatGLM3 message dicts for the request's `messages`; `text_of(message, where)` gives a message's text."""
    converted = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role in ("system", "developer"):
            converted.append({"role": "system", "content": text_of(message, where)})
        elif message.role == "user":
            converted.append({"role": "user", "content": text_of(message, where)})
        elif message.role in ("tool", "function"):
            converted.append({"role": "observation", "content": text_of(message, where)})
        elif message.role == "assistant":
            if message.content not in (None, "", []) or not message.tool_calls:
                converted.append({"role": "assistant", "metadata": "", "content": text_of(message, where)})
            for call_index, call in enumerate(message.tool_calls or []):
                place = f"{where}.tool_calls[{call_index}]"
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
                    raise RequestError(place, 'give {"type": "function", "function": {"name": ..., "arguments": "{...}"}}')
                body = call_text(function.get("arguments") or "{}", f"{place}.function.arguments")
                converted.append({"role": "assistant", "metadata": function["name"], "content": body})
        else:
            raise RequestError(f"{where}.role", f"{message.role!r} is not a chat role (system, developer, user, assistant, tool)")
    return converted


def tool_call_of(tokenizer, reply, tools):
    """(text, tool call or None) of a finished reply: the tokenizer reads it (a tool call only when tools
    were offered and the body is a literal `tool_call(...)`; never executed). A tool call is the OpenAI
    `{"id", "type", "function": {"name", "arguments"}}`."""
    history = [{"role": "system", "content": "", "tools": tools}] if tools else None
    response, _ = tokenizer.process_chat_response(reply, "", history)
    if isinstance(response, dict) and "parameters" in response:
        call = {"name": response["name"], "arguments": json.dumps(response["parameters"], ensure_ascii=False)}
        return None, {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
    if isinstance(response, dict):  # a tool turn without tools offered (the code interpreter's): its text
        return response["content"], None
    return response, None


def answer_start(reply):
    """Where a growing reply's text starts, after its first line (a tool's name, or empty); None
    while that line is not whole. Stop strings are looked for from there."""
    end = reply.find("\n")
    return None if end < 0 else end + 1


def visible_text(reply):
    """What of a growing reply can be shown as text now: after an empty first line (ChatGLM3 writes a
    tool's name there, and a tool turn is shown only once it is whole), stripped as the finished
    answer will be."""
    if "\n" not in reply:
        return ""
    metadata, content = reply.split("\n", 1)
    return "" if metadata.strip() else content.strip()
