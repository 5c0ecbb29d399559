"""What the interop tests share besides fixtures (conftest.py): where things are, reading a tool's output."""

import json
from pathlib import Path

from tiny_checkpoint import REPO_ROOT

INTEROP_VARIABLE = "CHATGLM_INTEROP_DIR"
HERE = Path(__file__).resolve().parent
DEMO_MODEL = REPO_ROOT / "demo" / "tiny-chatglm2"
GLM3_QUERY = "你好"


def last_json_line(text):
    """The last line of `text` that is a JSON object (tools print their own lines before it)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the output:\n{text[-3000:]}")
