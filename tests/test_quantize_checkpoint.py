"""tools/quantize_checkpoint.py: released fp16 shards in, a loadable INT4/INT8 checkpoint out.

How the tool treats its source and destination folders (links, nesting, failures half way) is
tested with upgrade_checkpoint.py's in tests/test_model_folder.py.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from tiny_checkpoint import REPO_ROOT, random_model, write_released_shards
from tools import quantize_checkpoint

VOCAB = 2048  # the conftest tokenizer's 2005 ids, padded
TOOL = REPO_ROOT / "tools" / "quantize_checkpoint.py"


@pytest.fixture(scope="module")
def released_fp16(tmp_path_factory, sentencepiece_model_path):
    folder = tmp_path_factory.mktemp("fp16-release")
    model = random_model(folder, VOCAB, add_qkv_bias=True, torch_dtype="float16").half()
    write_released_shards(model.state_dict(), folder, num_shards=3)
    shutil.copy(sentencepiece_model_path, folder / "tokenizer.model")
    return folder


def run_tool(*args):
    """The command line as a user runs it (a fresh interpreter: seconds on a loaded machine)."""
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


def run_main(capsys, *args):
    """The same, in this process: (exit status, stderr)."""
    status = quantize_checkpoint.main([str(arg) for arg in args])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("bits", [4, 8])
def test_converted_checkpoint_equals_quantizing_the_loaded_model(released_fp16, tmp_path, bits, capsys):
    destination = tmp_path / f"int{bits}"
    if bits == 4:
        result = run_tool("--bits", bits, released_fp16, destination)
        assert result.returncode == 0, result.stderr
    else:
        assert run_main(capsys, "--bits", bits, released_fp16, destination)[0] == 0
    shards = list(destination.glob("model-*-of-00003.safetensors"))
    assert len(shards) == 3
    # As readable as the config written beside them (safetensors alone makes them owner-only).
    config_mode = (destination / "config.json").stat().st_mode & 0o777
    assert all(shard.stat().st_mode & 0o777 == config_mode for shard in shards)
    assert (destination / "tokenizer.model").read_bytes() == (released_fp16 / "tokenizer.model").read_bytes()

    converted, info = AutoModel.from_pretrained(
        destination, trust_remote_code=True, dtype="auto", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert converted.config.quantization_bit == bits
    expected = AutoModel.from_pretrained(released_fp16, trust_remote_code=True, dtype="auto").quantize(bits)
    for key, tensor in expected.state_dict().items():
        assert torch.equal(converted.state_dict()[key], tensor), key


def test_quantized_folder_keeps_the_chat_format_stop_ids_and_rotary_fields(released_fp16, tmp_path):
    """A ChatGLM3-32k folder upgraded by this package stays ChatGLM3 when quantized (chat format,
    template, stop ids), and its config says what rope_ratio scales, so a renamed copy keeps it too."""
    from tools import upgrade_checkpoint

    release = tmp_path / "release"
    shutil.copytree(released_fp16, release)
    config = json.loads((release / "config.json").read_text())
    config.update(_name_or_path="THUDM/chatglm3-6b-32k", rope_ratio=50)
    (release / "config.json").write_text(json.dumps(config))
    source = tmp_path / "upgraded"
    assert upgrade_checkpoint.main([str(release), str(source)]) == 0

    destination = tmp_path / "int8"
    assert quantize_checkpoint.main(["--bits", "8", str(source), str(destination)]) == 0
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert json.loads((destination / name).read_text()) == json.loads((source / name).read_text()), name
    written = json.loads((destination / "config.json").read_text())
    source_config = json.loads((source / "config.json").read_text())
    assert written == {**source_config, "quantization_bit": 8, "rope_ratio_applies_to": "base"}

    (destination / "config.json").write_text(json.dumps({**written, "_name_or_path": "my-assistant"}))
    tokenizer = AutoTokenizer.from_pretrained(destination, trust_remote_code=True)
    assert tokenizer.chat_format == "chatglm3" and tokenizer.chat_stop_ids == [2, 2006, 2008]
    model = AutoModel.from_pretrained(destination, trust_remote_code=True)
    assert model.generation_config.eos_token_id == [2, 2006, 2008]
    assert (model.config.rope_ratio, model.config.rope_ratio_applies_to) == (50, "base")


def assert_refused(result, *fragments):
    status, stderr = result
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_refuses_sources_that_are_not_floating_point_chatglm2(released_fp16, tmp_path, capsys):
    result = run_tool("--bits", 4, tmp_path / "missing", tmp_path / "out")
    assert_refused((result.returncode, result.stderr), "no such folder")
    llama = tmp_path / "llama"
    shutil.copytree(released_fp16, llama)
    (llama / "config.json").write_text('{"model_type": "llama"}')
    assert_refused(run_main(capsys, "--bits", 4, llama, tmp_path / "out"), "model_type is 'llama'")

    quantized = tmp_path / "int8"
    assert run_main(capsys, "--bits", 8, released_fp16, quantized)[0] == 0
    assert_refused(run_main(capsys, "--bits", 4, quantized, tmp_path / "again"), "already quantized to 8 bits")
    assert_refused(run_main(capsys, "--bits", 8, released_fp16, quantized), "--force")
    assert not (tmp_path / "out").exists() and not (tmp_path / "again").exists()


def broken_copy(released, folder, damage):
    shutil.copytree(released, folder)
    damage(folder)
    return folder


def set_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Each was accepted before (exit status 0 and an output that does not load, or a traceback and an
# empty DST); now each is refused, naming the file, before anything is written.
BROKEN_SOURCES = {
    "no tokenizer": (lambda f: (f / "tokenizer.model").unlink(), "tokenizer.model is missing"),
    "not a tokenizer": (lambda f: (f / "tokenizer.model").write_bytes(b"\0" * 64), "not a SentencePiece model"),
    "config not json": (lambda f: (f / "config.json").write_text("{"), "config.json: cannot read it as JSON"),
    "config with a bad value": (lambda f: set_config(f, num_layers="two"), "ChatGLMConfig.num_layers must be a positive integer, got 'two'"),
    "truncated shard": (lambda f: truncate(f / "pytorch_model-00002-of-00003.bin"), "pytorch_model-00002-of-00003.bin: cannot read"),
    "missing shard": (lambda f: (f / "pytorch_model-00003-of-00003.bin").unlink(), "pytorch_model-00003-of-00003.bin is missing"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SOURCES))
def test_refuses_broken_sources_before_writing(case, released_fp16, tmp_path, capsys):
    damage, fragment = BROKEN_SOURCES[case]
    source = broken_copy(released_fp16, tmp_path / "src", damage)
    assert_refused(run_main(capsys, "--bits", 4, source, tmp_path / "out"), fragment)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"], "no DST, no partial folder"
