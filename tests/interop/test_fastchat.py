"""FastChat 0.2.36 serves ChatGLM through its own `generate_stream_chatglm`, which calls the published
`model.stream_generate` and `tokenizer.decode` (special tokens not skipped), and for ChatGLM3
`tokenizer.build_chat_input`. Its greedy answer must equal this package's `model.chat`, on transformers
4.57.6 and 5.x. The answers end on the model's own stop token (`</s>`; `<|user|>` for ChatGLM3)
before the token limit: since decode keeps special tokens' text, the stop token's text reaches
FastChat's answer unless stream_generate leaves that step out (the published ChatGLM2 tokenizer
decoded `</s>` as '')."""

import pytest

from interop_tools import DEMO_MODEL, GLM3_QUERY, HERE, last_json_line

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24


@pytest.mark.parametrize("venv", ["tools-4.57", "tools-5"])
@pytest.mark.parametrize(
    "model, template, query",
    [("demo", "chatglm2", "你好"), ("demo", "chatglm2", "Good evening"), ("glm3", "chatglm3", GLM3_QUERY)],
    ids=["chatglm2-你好", "chatglm2-evening", "chatglm3"],
)
def test_fastchat_answers_as_model_chat(run_tool, versions, glm3_folder, venv, model, template, query):
    folder = DEMO_MODEL if model == "demo" else glm3_folder
    result = last_json_line(run_tool(venv, HERE / "fastchat_chat.py", folder, query, MAX_NEW_TOKENS).stdout)
    assert result["versions"]["fschat"] == versions["FASTCHAT"]
    assert (result["template"], result["stream_function"]) == (template, "generate_stream_chatglm")
    # The answer ended on the model's stop token (</s>, or <|user|> for the ChatGLM3 model).
    assert result["usage"]["completion_tokens"] < MAX_NEW_TOKENS
    assert result["ours"], "model.chat gave an empty answer: nothing to compare"
    assert result["fastchat"] == result["ours"]
