"""tools/upgrade_checkpoint.py: a downloaded release folder becomes one that runs this package's code.

The "release" folders here are tiny random ChatGLM2 models saved with the released file names
(sharded `.bin` files plus their index, or the int4 release's single `pytorch_model.bin`), beside
stand-ins for the published code that fail if they are ever run.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from tiny_checkpoint import REPO_ROOT, random_model, write_released_shards
from tools import upgrade_checkpoint as tool
from tools.model_folder import MODEL_MODULES, PACKAGE_FILES, PACKAGE_JSON_FILES

TOOL = REPO_ROOT / "tools" / "upgrade_checkpoint.py"
VOCAB_ROWS = 2048  # the conftest tokenizer has 2000 pieces + 5 special tokens
PUBLISHED_CODE_STAND_IN = 'raise RuntimeError("the published code ran instead of this package\'s")\n'




def make_release(folder, sentencepiece_model_path, **config_overrides):
    """A random tiny model in `folder` laid out like the release, minus its weight files; returns the model."""
    model = random_model(folder, VOCAB_ROWS, add_qkv_bias=True, **config_overrides)
    for name in MODEL_MODULES:
        (folder / name).write_text(PUBLISHED_CODE_STAND_IN)
    for name in PACKAGE_JSON_FILES:
        (folder / name).unlink(missing_ok=True)
    shutil.copy(sentencepiece_model_path, folder / "tokenizer.model")
    return model


@pytest.fixture(scope="module")
def sharded_release(tmp_path_factory, sentencepiece_model_path):
    folder = tmp_path_factory.mktemp("chatglm2-6b")
    model = make_release(folder, sentencepiece_model_path)
    write_released_shards(model.state_dict(), folder, num_shards=3)
    return folder, model


def input_ids():
    return torch.tensor([[64 + 7 * i for i in range(12)]])


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_sharded_release_runs_this_package_code_on_linked_weights(sharded_release, tmp_path):
    src, original = sharded_release
    dst = tmp_path / "upgraded"
    result = run_tool(src, dst)
    assert result.returncode == 0, result.stderr
    assert "trust_remote_code=True" in result.stdout

    weight_names = ["pytorch_model.bin.index.json"] + [f"pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3)]
    for name in weight_names + ["tokenizer.model"]:
        assert (dst / name).is_symlink(), f"{name} should be a link, not a copy"
        assert os.path.samefile(dst / name, src / name)
    for name in PACKAGE_FILES:
        assert (dst / name).read_bytes() == (REPO_ROOT / name).read_bytes(), name

    config = json.loads((dst / "config.json").read_text())
    source_config = json.loads((src / "config.json").read_text())
    assert config["auto_map"] == json.loads((REPO_ROOT / "config.json").read_text())["auto_map"]
    assert {key: value for key, value in config.items() if key != "auto_map"} == {
        key: value for key, value in source_config.items() if key != "auto_map"
    }

    loaded, info = AutoModel.from_pretrained(dst, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    module_file = sys.modules[type(loaded).__module__].__file__
    assert open(module_file, encoding="utf-8").read() == (REPO_ROOT / "modeling_chatglm.py").read_text(encoding="utf-8")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids()).logits, original(input_ids()).logits, rtol=0, atol=0)

    tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
    assert tokenizer.decode(tokenizer("你好, world")["input_ids"], skip_special_tokens=True) == "你好, world"


def test_int4_release_keeps_its_quantization(tmp_path, sentencepiece_model_path):
    src = tmp_path / "chatglm2-6b-int4"
    model = make_release(src, sentencepiece_model_path).quantize(4)
    # The int4 release: quantization_bit in the config, the packed weights in one pickle.
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    dst = tmp_path / "upgraded"
    assert tool.main([str(src), str(dst)]) == 0

    assert json.loads((dst / "config.json").read_text())["quantization_bit"] == 4
    assert (dst / "pytorch_model.bin").is_symlink()
    loaded, info = AutoModel.from_pretrained(dst, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    qkv = loaded.transformer.encoder.layers[0].self_attention.query_key_value
    assert qkv.weight.dtype == torch.int8 and qkv.weight.shape[1] == qkv.in_features // 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids()).logits, model(input_ids()).logits, rtol=0, atol=0)


def test_copy_flag_copies_instead_of_linking(sharded_release, tmp_path):
    src, _ = sharded_release
    dst = tmp_path / "copied"
    assert tool.main([str(src), str(dst), "--copy"]) == 0
    for name in ("pytorch_model.bin.index.json", "pytorch_model-00002-of-00003.bin", "tokenizer.model"):
        assert not (dst / name).is_symlink()
        assert (dst / name).read_bytes() == (src / name).read_bytes()


def test_non_empty_destination_needs_force(sharded_release, tmp_path, capsys):
    src, _ = sharded_release
    dst = tmp_path / "busy"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    (dst / "model.safetensors").write_text("stale weights transformers would prefer")
    assert tool.main([str(src), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err
    assert tool.main([str(src), str(dst), "--force"]) == 0
    assert (dst / "notes.txt").read_text() == "mine"
    assert not (dst / "model.safetensors").exists()
    assert (dst / "pytorch_model.bin.index.json").is_symlink()


def break_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def remove(folder, name):
    (folder / name).unlink()


REFUSALS = {
    "no config": (lambda f: remove(f, "config.json"), "config.json is missing"),
    "not chatglm": (lambda f: break_config(f, model_type="llama"), "model_type is 'llama'"),
    "chatglm v1": (
        lambda f: break_config(f, position_encoding_2d=True, padded_vocab_size=None, multi_query_attention=None),
        "ChatGLM-6B (v1)",
    ),
    "missing shape key": (lambda f: break_config(f, multi_query_attention=None), "lacks multi_query_attention"),
    "rope_ratio of no known release": (lambda f: break_config(f, rope_ratio=16), "rope_ratio_applies_to must be set"),
    "glm-4": (lambda f: break_config(f, _name_or_path="THUDM/glm-4-9b-chat"), "GLM-4"),
    "no tokenizer": (lambda f: remove(f, "tokenizer.model"), "tokenizer.model is missing"),
    "bad tokenizer": (lambda f: (f / "tokenizer.model").write_bytes(b"not a model"), "not a SentencePiece model"),
    "vocab too small": (lambda f: break_config(f, padded_vocab_size=1024), "do not fit"),
    "missing shard": (lambda f: remove(f, "pytorch_model-00002-of-00003.bin"), "pytorch_model-00002-of-00003.bin is missing"),
    "no weights": (
        lambda f: [remove(f, p.name) for p in list(f.iterdir()) if p.name.startswith("pytorch_model")],
        "holds no weights",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refuses_folders_that_are_not_chatglm2_checkpoints(case, sharded_release, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(sharded_release[0], src)
    damage, reason = REFUSALS[case]
    damage(src)
    dst = tmp_path / "dst"
    assert tool.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert reason in err
    assert not dst.exists(), "nothing may be written when the source is refused"


def test_refusals_from_the_command_line_are_one_line(tmp_path):
    result = run_tool(tmp_path / "nowhere", tmp_path / "dst")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: SRC {tmp_path / 'nowhere'}: no such folder"]
    assert "Traceback" not in result.stderr


def test_destination_may_not_be_the_source(sharded_release):
    src, _ = sharded_release
    assert tool.main([str(src), str(src), "--force"]) == 2
    assert (src / "modeling_chatglm.py").read_text() == PUBLISHED_CODE_STAND_IN


FAMILY = {
    # _name_or_path: (config changes, what the tool reports, chat format, eos ids)
    "THUDM/chatglm2-6b": ({}, "chatglm2-6b (chatglm2 chat format, seq_length 256, rotary base 10000)", "chatglm2", 2),
    "THUDM/chatglm2-6b-32k": (
        {"rope_ratio": 16},
        "chatglm2-6b-32k (chatglm2 chat format, seq_length 256, rope_ratio 16 applied to the positions)",
        "chatglm2",
        2,
    ),
    "THUDM/chatglm3-6b": ({}, "chatglm3-6b (chatglm3 chat format, seq_length 256, rotary base 10000)", "chatglm3", [2, 2006, 2008]),
    "THUDM/chatglm3-6b-base": ({}, "chatglm3-6b-base (chatglm3 chat format", "chatglm3", [2, 2006, 2008]),
    "THUDM/chatglm3-6b-32k": (
        {"rope_ratio": 50},
        "chatglm3-6b-32k (chatglm3 chat format, seq_length 256, rope_ratio 50 applied to the base)",
        "chatglm3",
        [2, 2006, 2008],
    ),
    "THUDM/chatglm3-6b-128k": ({"rope_ratio": 500}, "rope_ratio 500 applied to the base", "chatglm3", [2, 2006, 2008]),
    "THUDM/codegeex2-6b": (
        {"interleaved_qkv": False, "rotary_percent": 0.5, "pad_token_id": None},
        "codegeex2-6b (chatglm2 chat format",
        "chatglm2",
        2,
    ),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_every_family_folder_is_recognised_and_named(name, sharded_release, tmp_path, capsys):
    changes, reported, chat_format, eos = FAMILY[name]
    src = tmp_path / "src"
    shutil.copytree(sharded_release[0], src)
    break_config(src, _name_or_path=name, **changes)
    dst = tmp_path / "dst"
    assert tool.main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"found {name.split('/')[-1]} (") and reported in out
    tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
    assert tokenizer.chat_format == chat_format
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == eos
    if chat_format == "chatglm3":
        assert json.loads((dst / "tokenizer_config.json").read_text())["chat_template"] == tokenizer.chat_template
        assert "<|assistant|>" in tokenizer.chat_template
    model = AutoModel.from_pretrained(dst, trust_remote_code=True).eval()
    assert model.config.rope_ratio == changes.get("rope_ratio", 1)


def released_chatglm3_tokenizer_config():
    """The release's tokenizer_config.json as far as it tells the dialect: its role tokens and template."""
    return {
        "added_tokens_decoder": {"2006": {"content": "<|user|>", "special": True}},
        "chat_template": "{% for message in messages %}<|{{ message['role'] }}|>\n {{ message['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
        "tokenizer_class": "ChatGLMTokenizer",
    }


@pytest.mark.parametrize("marks", ["added tokens", "chat template"])
def test_release_tokenizer_config_with_role_tokens_marks_the_dialect(marks, sharded_release, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sharded_release[0], src)
    tokenizer_config = released_chatglm3_tokenizer_config()
    tokenizer_config.pop("chat_template" if marks == "added tokens" else "added_tokens_decoder")
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert tool.main([str(src), str(tmp_path / "dst")]) == 0
    assert json.loads((tmp_path / "dst" / "tokenizer_config.json").read_text())["chat_format"] == "chatglm3"


@pytest.mark.parametrize("serving", [False, True], ids=["plain", "for-serving"])
def test_chatglm2_folder_holding_this_package_code_stays_chatglm2(serving, sharded_release, tmp_path, capsys):
    """The code files say nothing about the weights: this package's tokenizer file names `<|user|>`,
    and a ChatGLM2 folder holding it (copied in, or upgraded before) is still ChatGLM2."""
    src = tmp_path / "src"
    shutil.copytree(sharded_release[0], src)
    for name in MODEL_MODULES:
        shutil.copy(REPO_ROOT / name, src / name)
    assert "<|user|>" in (src / "tokenization_chatglm.py").read_text(encoding="utf-8")
    flags = ["--for-serving"] if serving else []
    once, twice = tmp_path / "once", tmp_path / "twice"
    for source, destination in ((src, once), (once, twice)):
        assert tool.main([str(source), str(destination), *flags]) == 0
        assert "chatglm2 chat format" in capsys.readouterr().out
        tokenizer = AutoTokenizer.from_pretrained(destination, trust_remote_code=True)
        assert tokenizer.chat_format == "chatglm2"
        assert json.loads((destination / "generation_config.json").read_text())["eos_token_id"] == 2
        assert tokenizer.build_chat_input("你好")["input_ids"][0].tolist() == tokenizer(tokenizer.build_prompt("你好"))[
            "input_ids"
        ]


def test_a_folder_this_package_wrote_keeps_its_stated_chat_format(sharded_release, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(sharded_release[0], src)
    break_config(src, _name_or_path="THUDM/chatglm3-6b")
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert tool.main([str(src), str(once)]) == 0
    break_config(once, _name_or_path="my-finetune")  # the name no longer tells; the stated chat_format does
    assert tool.main([str(once), str(twice)]) == 0
    assert "chatglm3 chat format" in capsys.readouterr().out.splitlines()[-3]
    assert AutoTokenizer.from_pretrained(twice, trust_remote_code=True).chat_format == "chatglm3"
    assert json.loads((twice / "generation_config.json").read_text())["eos_token_id"] == [2, 2006, 2008]
