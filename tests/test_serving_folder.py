"""tools/upgrade_checkpoint.py --for-serving: a folder vLLM and SGLang serve unchanged.

The engines run their own ChatGLM model from config.json, load this package's tokenizer, render
tokenizer_config.json's chat template to one string and tokenize it with add_special_tokens=False
(/work/shared/glm-family.md §6). These tests do exactly that with the folder's own tokenizer and
compare the ids with the package's chat ids; vLLM itself is not installed here.
"""

import hashlib
import json
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from test_upgrade_checkpoint import break_config, input_ids, sharded_release  # noqa: F401 (a fixture)
from tokenization_chatglm import CHATGLM3_CHAT_TEMPLATE, CHATGLM3_TOOLS_PROMPT, SERVING_CHAT_TEMPLATE
from tools import upgrade_checkpoint as tool

# What vLLM's and SGLang's chatglm.py read from config.json (glm-family.md §6); original_rope has
# no default there, the rest fall back to values that need not be this checkpoint's.
ENGINE_READS = (
    "hidden_size", "num_attention_heads", "multi_query_attention", "multi_query_group_num",
    "add_bias_linear", "add_qkv_bias", "rope_ratio", "seq_length", "original_rope", "ffn_hidden_size",
    "apply_residual_connection_post_layernorm", "fp32_residual_connection", "rmsnorm",
    "layernorm_epsilon", "hidden_dropout", "post_layer_norm", "num_layers", "padded_vocab_size",
    "kv_channels", "tie_word_embeddings", "max_sequence_length",
)  # fmt: skip
TOOL = {
    "name": "get_weather",
    "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def digests(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def release(tmp_path, sharded_release, name, **changes):  # noqa: F811
    src = tmp_path / name.split("/")[-1]
    shutil.copytree(sharded_release[0], src)
    break_config(src, _name_or_path=name, **changes)
    return src


def serve_folder(src, dst):
    before = digests(src)
    assert tool.main([str(src), str(dst), "--for-serving"]) == 0
    assert digests(src) == before, "the source's files must not change"
    return dst


def test_config_carries_every_attribute_the_engines_read(sharded_release, tmp_path):  # noqa: F811
    # Keys a folder saved elsewhere may lack; the engines would fail (original_rope) or guess.
    src = release(
        tmp_path, sharded_release, "THUDM/chatglm2-6b", original_rope=None, tie_word_embeddings=None, hidden_dropout=None
    )
    dst = serve_folder(src, tmp_path / "served")
    config = json.loads((dst / "config.json").read_text())
    assert [key for key in ENGINE_READS if key not in config] == []
    assert (config["original_rope"], config["tie_word_embeddings"], config["hidden_dropout"]) == (True, False, 0.0)
    assert config["max_sequence_length"] == config["seq_length"]
    assert config["architectures"] == ["ChatGLMModel"]  # the name SGLang and vLLM both register
    source = json.loads((src / "config.json").read_text())
    assert all(config[key] == value for key, value in source.items() if key not in ("auto_map", "architectures"))
    # The folder still runs this package's code on the linked weights.
    model = AutoModel.from_pretrained(dst, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, sharded_release[1](input_ids()).logits, rtol=0, atol=0)


def test_chatglm3_32k_is_servable_its_ratio_scales_the_base(sharded_release, tmp_path):  # noqa: F811
    src = release(tmp_path, sharded_release, "THUDM/chatglm3-6b-32k", rope_ratio=50)
    config = json.loads((serve_folder(src, tmp_path / "served") / "config.json").read_text())
    assert (config["rope_ratio"], config["original_rope"]) == (50, True)


@pytest.fixture(scope="module")
def folders(sharded_release, tmp_path_factory):  # noqa: F811
    """(served, ordinary) folders of a ChatGLM2 and a ChatGLM3 release."""
    out = {}
    for name in ("THUDM/chatglm2-6b", "THUDM/chatglm3-6b"):
        tmp_path = tmp_path_factory.mktemp(name.split("/")[-1])
        src = release(tmp_path, sharded_release, name)
        served = serve_folder(src, tmp_path / "served")
        assert tool.main([str(src), str(tmp_path / "ordinary")]) == 0
        out[name.split("/")[-1].split("-")[0]] = (served, tmp_path / "ordinary")
    return out


def engine_ids(folder, messages, tools=None):
    """What vLLM's chat endpoint does: the template rendered to one string, tokenized without special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert tokenizer.encode_special_tokens is True
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # transformers users of the same folder get the same ids (the prefix once, not twice).
    assert tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=False) == ids
    return ids


def user(text):
    return {"role": "user", "content": text}


def assistant(text, metadata=""):
    return {"role": "assistant", "metadata": metadata, "content": text}


CHATGLM2_CASES = {
    "one turn": ([user("你好")], ("你好", [])),
    "history": (
        [user("你好"), assistant("你好，我是 ChatGLM2。"), user("what is 1+1?")],
        ("what is 1+1?", [("你好", "你好，我是 ChatGLM2。")]),
    ),
    "system": ([{"role": "system", "content": "Answer briefly."}, user("你好")], None),
}


@pytest.mark.parametrize("case", sorted(CHATGLM2_CASES))
def test_chatglm2_rendered_template_gives_our_chat_ids(folders, case):
    served, ordinary = folders["chatglm2"]
    messages, chat_input = CHATGLM2_CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(ordinary, trust_remote_code=True)
    if chat_input is None:  # build_chat_input has no system message; the ordinary template places it
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    else:
        expected = tokenizer.build_chat_input(chat_input[0], history=chat_input[1])["input_ids"][0].tolist()
    assert expected[:2] == tokenizer.get_prefix_tokens()
    assert engine_ids(served, messages) == expected


CHATGLM3_CASES = {
    "one turn": ([user("你好")], None, ("你好", [], "user")),
    "history": (
        [user("你好"), assistant("你好！"), user("1+1?")],
        None,
        ("1+1?", [user("你好"), assistant("你好！")], "user"),
    ),
    "system": (
        [{"role": "system", "content": "Answer briefly."}, user("hi")],
        None,
        ("hi", [{"role": "system", "content": "Answer briefly."}], "user"),
    ),
    "tools": (
        [
            user("weather in Beijing?"),
            assistant("tool_call(city='Beijing')", "get_weather"),
            {"role": "observation", "content": '{"temp": 20}'},
        ],
        [{"type": "function", "function": TOOL}],
        (
            '{"temp": 20}',
            [
                {"role": "system", "content": CHATGLM3_TOOLS_PROMPT, "tools": [TOOL]},
                user("weather in Beijing?"),
                assistant("tool_call(city='Beijing')", "get_weather"),
            ],
            "observation",
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CHATGLM3_CASES))
def test_chatglm3_rendered_template_gives_our_chat_ids(folders, case):
    served, ordinary = folders["chatglm3"]
    messages, tools, (query, history, role) = CHATGLM3_CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(ordinary, trust_remote_code=True)
    assert tokenizer.chat_format == "chatglm3" and not tokenizer.encode_special_tokens
    expected = tokenizer.build_chat_input(query, history=history, role=role)["input_ids"][0].tolist()
    assert engine_ids(served, messages, tools) == expected


@pytest.mark.parametrize("chat_format", ["chatglm2", "chatglm3"])
def test_tokenizer_and_generation_files(folders, chat_format):
    served = folders[chat_format][0]
    tokenizer_config = json.loads((served / "tokenizer_config.json").read_text())
    template = SERVING_CHAT_TEMPLATE if chat_format == "chatglm2" else CHATGLM3_CHAT_TEMPLATE
    assert (tokenizer_config["encode_special_tokens"], tokenizer_config["chat_template"]) == (True, template)
    tokenizer = AutoTokenizer.from_pretrained(served, trust_remote_code=True)
    assert tokenizer.chat_template == template
    # ChatGLM3's turn ends at </s>, <|user|> or <|observation|> (64795, 64797 in the release's vocabulary).
    stops = tokenizer.convert_tokens_to_ids(["</s>", "<|user|>", "<|observation|>"]) if chat_format == "chatglm3" else 2
    assert json.loads((served / "generation_config.json").read_text())["eos_token_id"] == stops


REFUSALS = {
    "THUDM/chatglm2-6b-int4": ({"quantization_bit": 4}, "quantization_bit=4: vLLM and SGLang cannot read this int4 format"),
    "THUDM/chatglm2-6b-int8": ({"quantization_bit": 8}, "serve the fp16/bf16 release"),
    "THUDM/chatglm2-6b-32k": ({"rope_ratio": 16}, "rope_ratio 16 divides the positions (chatglm2-6b-32k), but vLLM"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refuses_what_the_engines_would_serve_wrongly(name, sharded_release, tmp_path, capsys):  # noqa: F811
    changes, reason = REFUSALS[name]
    src = release(tmp_path, sharded_release, name, **changes)
    before = digests(src)
    dst = tmp_path / "served"
    assert tool.main([str(src), str(dst), "--for-serving"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and reason in err, err
    assert not dst.exists() and digests(src) == before
    assert tool.main([str(src), str(dst)]) == 0  # an ordinary folder of it is still made
