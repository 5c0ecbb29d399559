"""tools/quantize_checkpoint.py: released fp16 shards in, a loadable INT4/INT8 checkpoint out."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModel

from tiny_checkpoint import REPO_ROOT, random_model, write_released_shards

VOCAB = 160
TOOL = REPO_ROOT / "tools" / "quantize_checkpoint.py"


@pytest.fixture(scope="module")
def released_fp16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16-release")
    model = random_model(folder, VOCAB, add_qkv_bias=True, torch_dtype="float16").half()
    write_released_shards(model.state_dict(), folder, num_shards=3)
    return folder


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_converted_checkpoint_equals_quantizing_the_loaded_model(released_fp16, tmp_path, bits):
    destination = tmp_path / f"int{bits}"
    result = run_tool("--bits", bits, released_fp16, destination)
    assert result.returncode == 0, result.stderr
    shards = list(destination.glob("model-*-of-00003.safetensors"))
    assert len(shards) == 3
    # As readable as the config written beside them (safetensors alone makes them owner-only).
    config_mode = (destination / "config.json").stat().st_mode & 0o777
    assert all(shard.stat().st_mode & 0o777 == config_mode for shard in shards)

    converted, info = AutoModel.from_pretrained(
        destination, trust_remote_code=True, dtype="auto", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert converted.config.quantization_bit == bits
    expected = AutoModel.from_pretrained(released_fp16, trust_remote_code=True, dtype="auto").quantize(bits)
    for key, tensor in expected.state_dict().items():
        assert torch.equal(converted.state_dict()[key], tensor), key


def test_refuses_sources_that_are_not_floating_point_chatglm2(released_fp16, tmp_path):
    result = run_tool("--bits", 4, tmp_path / "missing", tmp_path / "out")
    assert result.returncode == 2 and "is not a folder" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "llama"}')
    result = run_tool("--bits", 4, empty, tmp_path / "out")
    assert result.returncode == 2 and "not a ChatGLM2 config" in result.stderr

    quantized = tmp_path / "int8"
    assert run_tool("--bits", 8, released_fp16, quantized).returncode == 0
    result = run_tool("--bits", 4, quantized, tmp_path / "again")
    assert result.returncode == 2 and "already quantized to 8 bits" in result.stderr
    result = run_tool("--bits", 8, released_fp16, quantized)
    assert result.returncode == 2 and "--force" in result.stderr
