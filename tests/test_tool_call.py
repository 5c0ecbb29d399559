"""ChatGLM3 tool calls are parsed, never executed (issue 14; glm-family facts §2 item 6, §3).

The published `process_response` ran the model's `tool_call(...)` text through `eval`. The
package's `parse_tool_call` accepts one `tool_call` with literal keyword arguments and returns
every other text unchanged. The hostile cases below would run code, touch the file system or
hang under `eval`; a marker file proves nothing ran.
"""

import importlib
import json

import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def parse_tool_call(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    return importlib.import_module(type(tokenizer).__module__).parse_tool_call


def fenced(code):
    return f"```python\n{code}\n```"


def test_the_published_example_becomes_name_and_parameters(parse_tool_call):
    content = fenced('tool_call(location="beijing", unit="celsius")')
    assert parse_tool_call("get_current_weather", content) == {
        "name": "get_current_weather",
        "parameters": {"location": "beijing", "unit": "celsius"},
    }


@pytest.mark.parametrize(
    "code, parameters",
    [
        ("tool_call()", {}),
        ("tool_call(n=3, x=-1.5, ok=True, none=None)", {"n": 3, "x": -1.5, "ok": True, "none": None}),
        ("tool_call(items=[1, 'a', (2, 3)], opts={'k': [None]})", {"items": [1, "a", (2, 3)], "opts": {"k": [None]}}),
        ("tool_call(text='line\\nbreak \\u4f60\\u597d', q=\"it's\")", {"text": "line\nbreak 你好", "q": "it's"}),
        ("tool_call(\n    a=1,\n    b='two',\n)", {"a": 1, "b": "two"}),
    ],
)
def test_literal_keyword_arguments_are_read(parse_tool_call, code, parameters):
    result = parse_tool_call(" search \n", fenced(code))
    assert result == {"name": "search", "parameters": parameters}
    json.dumps(result)  # what an OpenAI-style server sends on


def test_an_unfenced_call_and_surrounding_whitespace_are_accepted(parse_tool_call):
    assert parse_tool_call("f", "  tool_call(a=1)\n") == {"name": "f", "parameters": {"a": 1}}
    assert parse_tool_call("f", "\n```\ntool_call(a=1)\n```\n") == {"name": "f", "parameters": {"a": 1}}


HOSTILE = [
    "__import__('os').system('touch {marker}')",
    "tool_call(x=__import__('os').system('touch {marker}'))",
    "tool_call(x=open('{marker}', 'w'))",
    "tool_call(x=(lambda: open('{marker}', 'w'))())",
    "tool_call(**{{'x': __import__('os').system('touch {marker}')}})",
    "tool_call(x=tool_call(y=1))",
    "tool_call(x=os.path)",
    "tool_call(x=().__class__.__base__.__subclasses__())",
    "tool_call.__globals__",
    "getattr(tool_call, 'x')(a=1)",
    "tool_call(x=[i for i in range(10)])",
    "tool_call(x=2**10**10)",
    "tool_call(x='a' * 10**9)",
    "tool_call(x=-(-1))",
    "tool_call(x=f'{{1}}')",
    "tool_call(x=undefined_name)",
    "tool_call('positional')",
    "tool_call(*args)",
    "tool_call(a=1); __import__('os').system('touch {marker}')",
    "tool_call(a=1)\n__import__('os').system('touch {marker}')",
    "other_tool(a=1)",
    "tool_call",
    "tool_call(a=1)(b=2)",
    "(x := tool_call(a=1))",
    "tool_call(x={{1, 2}})",
    "tool_call(x=b'bytes')",
    "tool_call(x=1j)",
    "tool_call(x=1e999)",
    "tool_call(x={{1: 'non-string key'}})",
    "tool_call(a=1, a=2)",
    "tool_call(a=1",
    "",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_anything_but_a_literal_call_comes_back_as_text_and_runs_nothing(parse_tool_call, tmp_path, template):
    marker = tmp_path / "ran"
    content = fenced(template.format(marker=marker))
    assert parse_tool_call("tool", content) == content
    assert parse_tool_call("tool", template.format(marker=marker)) == template.format(marker=marker)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        "tool_call(x='" + "a" * 20000 + "')",
        "tool_call(x=" + "[" * 150 + "]" * 150 + ")",
        "tool_call(x=" + "[" * 5000 + "]" * 5000 + ")",
        "tool_call(x=" + "-" * 10000 + "1)",
        "tool_call(x=" + "(" * 10000 + "1" + ")" * 10000 + ")",
        "tool_call(x=" + "9" * 5000 + ")",
        "tool_call(" + ", ".join(f"k{i}={i}" for i in range(3000)) + ")",
    ],
)
def test_huge_or_deeply_nested_inputs_are_bounded(parse_tool_call, content):
    result = parse_tool_call("tool", content)
    if len(content) > 16384:
        assert result == content
    elif isinstance(result, dict):  # within the bounds, a legal literal is still a call
        assert result["name"] == "tool"
    else:
        assert result == content


def test_the_size_bound_is_a_parameter(parse_tool_call):
    content = "tool_call(x='" + "a" * 100 + "')"
    assert parse_tool_call("tool", content, max_chars=50) == content
    assert parse_tool_call("tool", content, max_chars=200)["parameters"]["x"] == "a" * 100


@pytest.mark.parametrize("metadata", ["", "   ", "two\nlines", None, 3])
def test_a_turn_without_a_one_line_tool_name_is_text(parse_tool_call, metadata):
    content = fenced("tool_call(a=1)")
    assert parse_tool_call(metadata, content) == content


def test_code_interpreter_turns_stay_text(parse_tool_call):
    content = fenced("import math\nprint(math.pi)")
    assert parse_tool_call("interpreter", content) == content
