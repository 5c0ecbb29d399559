"""The released tensor list of a ChatGLM2 config, and the bytes a decoded token must read.

The tensors (names, shapes, order, which ones int8/int4 quantize) come from the model itself, built
from this repository's code on the `meta` device (no memory, no weights), so the benchmark cannot
drift from the model it measures; the rest is arithmetic on a `config.json` dict (spec §2 and §6).
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# `--quick`: tiny shapes that exercise every code path in seconds. Dimensions stay multiples of 128
# so that quantized CPU kernels with blocked layouts see shapes they accept, as the 6B shapes are.
QUICK_SHAPES = {
    "num_layers": 2,
    "hidden_size": 128,
    "ffn_hidden_size": 256,
    "kv_channels": 32,
    "num_attention_heads": 4,
    "multi_query_group_num": 2,
    "padded_vocab_size": 1024,
    "seq_length": 1024,
}

SHAPE_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "kv_channels",
    "num_attention_heads",
    "multi_query_attention",
    "multi_query_group_num",
    "padded_vocab_size",
    "add_qkv_bias",
    "add_bias_linear",
)


def released_config(quick=False):
    """The repository's `config.json` (the 6B release's), with the tiny shapes applied for `--quick`."""
    config = json.loads((REPO_ROOT / "config.json").read_text())
    if quick:
        config.update(QUICK_SHAPES)
    return config


def shape_summary(config):
    """The config entries that decide tensor shapes: what a cached checkpoint must match."""
    return {key: config[key] for key in SHAPE_KEYS}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    init: str  # "normal" (std 0.02), "ones" (norm weights) or "inv_freq" (the exact rotary buffer)
    quantized: bool  # int8/int4 store it quantized (an int8 tensor plus `{name}_scale`)

    @property
    def numel(self):
        count = 1
        for size in self.shape:
            count *= size
        return count


def _initializer(name):
    if name.endswith("rotary_pos_emb.inv_freq"):
        return "inv_freq"
    if name.endswith("layernorm.weight"):
        return "ones"
    return "normal"


@functools.lru_cache(maxsize=4)
def _meta_state_shapes(shapes_json, quantization_bit):
    """{name: (shape, dtype)} of the model's state dict, the model built from this repository's code on `meta`."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(
        REPO_ROOT, trust_remote_code=True, quantization_bit=quantization_bit, **json.loads(shapes_json)
    )
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True, dtype=torch.float16)
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in model.state_dict().items()}


def release_tensors(config):
    """Every tensor of the floating-point release, in the release's (the model's state dict) order (spec §2)."""
    shapes_json = json.dumps(shape_summary(config), sort_keys=True)
    float_model = _meta_state_shapes(shapes_json, 0)
    quantized_model = _meta_state_shapes(shapes_json, 4)
    return [
        TensorSpec(name, shape, _initializer(name), quantized=quantized_model[name][1] == torch.int8)
        for name, (shape, _) in float_model.items()
    ]


def kv_cache_bytes_per_token(config, element_bytes=2):
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else config["num_attention_heads"]
    return config["num_layers"] * 2 * groups * config["kv_channels"] * element_bytes


def decode_step_bytes(config, bits, context, batch=1, element_bytes=2, output_layer_bits=16, weight_bytes=None):
    """Bytes one decode step must read from memory: the least any implementation can move.

    The quantized matrices at `bits` (16 = unquantized) with one scale per output row, `output_layer`
    likewise at `output_layer_bits`, the other weights except the embedding (a decode step reads one
    row of it) at `element_bytes`, and the KV cache of `context` tokens for each of `batch` sequences.
    `weight_bytes`: another engine's weights but the embedding (a peer's file, in its own formats) instead.
    """
    if weight_bytes is not None:
        weights = weight_bytes + config["hidden_size"] * element_bytes * batch
        return weights + kv_cache_bytes_per_token(config, element_bytes) * context * batch
    weights = 0
    for tensor in release_tensors(config):
        if tensor.name == "transformer.embedding.word_embeddings.weight":
            weights += tensor.shape[1] * element_bytes * batch
            continue
        if tensor.init == "inv_freq":
            continue
        if tensor.name == "transformer.output_layer.weight":
            tensor_bits = output_layer_bits
        else:
            tensor_bits = bits if tensor.quantized else 16
        if tensor_bits < 16:
            weights += tensor.numel * tensor_bits // 8 + tensor.shape[0] * element_bytes
        else:
            weights += tensor.numel * element_bytes
    return weights + kv_cache_bytes_per_token(config, element_bytes) * context * batch


def decode_roofline(config, bits, bandwidth_bytes_per_second, prompt_length, new_tokens, batch, output_layer_bits=16, weight_bytes=None):
    """Tokens/s if a decode step took exactly its bytes / bandwidth, at the mean context of the run."""
    mean_context = prompt_length + new_tokens / 2
    step_bytes = decode_step_bytes(config, bits, mean_context, batch, output_layer_bits=output_layer_bits, weight_bytes=weight_bytes)
    return {
        "bytes_per_step": step_bytes,
        "tokens_per_second": batch * bandwidth_bytes_per_second / step_bytes,
    }
