"""The released tensor list of a ChatGLM2 config, and the bytes a decoded token must read.

Everything here is arithmetic on a `config.json` dict (spec §2 and §6), so the orchestrator can plan
checkpoints and rooflines without importing the model code.
"""

import json
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The four projection matrices of every layer that int8/int4 quantize (spec §6).
QUANTIZED_MATRICES = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)

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

    @property
    def numel(self):
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def quantized(self):
        return self.name.endswith(".weight") and self.name[: -len(".weight")].endswith(QUANTIZED_MATRICES)


def qkv_size(config):
    heads, head_dim = config["num_attention_heads"], config["kv_channels"]
    if config["multi_query_attention"]:
        return heads * head_dim + 2 * config["multi_query_group_num"] * head_dim
    return 3 * heads * head_dim


def release_tensors(config):
    """Every tensor of the floating-point release, in the release's order (spec §2)."""
    hidden, ffn, vocab = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    projection = config["num_attention_heads"] * config["kv_channels"]
    tensors = [
        TensorSpec("transformer.embedding.word_embeddings.weight", (vocab, hidden), "normal"),
        TensorSpec("transformer.rotary_pos_emb.inv_freq", (config["kv_channels"] // 4,), "inv_freq"),
    ]
    for layer in range(config["num_layers"]):
        prefix = f"transformer.encoder.layers.{layer}."
        tensors.append(TensorSpec(prefix + "input_layernorm.weight", (hidden,), "ones"))
        tensors.append(TensorSpec(prefix + "self_attention.query_key_value.weight", (qkv_size(config), hidden), "normal"))
        if config["add_qkv_bias"] or config["add_bias_linear"]:
            tensors.append(TensorSpec(prefix + "self_attention.query_key_value.bias", (qkv_size(config),), "normal"))
        tensors.append(TensorSpec(prefix + "self_attention.dense.weight", (hidden, projection), "normal"))
        tensors.append(TensorSpec(prefix + "post_attention_layernorm.weight", (hidden,), "ones"))
        tensors.append(TensorSpec(prefix + "mlp.dense_h_to_4h.weight", (2 * ffn, hidden), "normal"))
        tensors.append(TensorSpec(prefix + "mlp.dense_4h_to_h.weight", (hidden, ffn), "normal"))
        if config["add_bias_linear"]:
            for name, size in (("self_attention.dense", hidden), ("mlp.dense_h_to_4h", 2 * ffn), ("mlp.dense_4h_to_h", hidden)):
                tensors.append(TensorSpec(prefix + name + ".bias", (size,), "normal"))
    tensors.append(TensorSpec("transformer.encoder.final_layernorm.weight", (hidden,), "ones"))
    tensors.append(TensorSpec("transformer.output_layer.weight", (vocab, hidden), "normal"))
    return tensors


def kv_cache_bytes_per_token(config, element_bytes=2):
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else config["num_attention_heads"]
    return config["num_layers"] * 2 * groups * config["kv_channels"] * element_bytes


def decode_step_bytes(config, bits, context, batch=1, element_bytes=2, output_layer_bits=16):
    """Bytes one decode step must read from memory: the least any implementation can move.

    The quantized matrices at `bits` (16 = unquantized) with one scale per output row, `output_layer`
    likewise at `output_layer_bits`, the other weights except the embedding (a decode step reads one
    row of it) at `element_bytes`, and the KV cache of `context` tokens for each of `batch` sequences.
    """
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


def decode_roofline(config, bits, bandwidth_bytes_per_second, prompt_length, new_tokens, batch, output_layer_bits=16):
    """Tokens/s if a decode step took exactly its bytes / bandwidth, at the mean context of the run."""
    mean_context = prompt_length + new_tokens / 2
    step_bytes = decode_step_bytes(config, bits, mean_context, batch, output_layer_bits=output_layer_bits)
    return {
        "bytes_per_step": step_bytes,
        "tokens_per_second": batch * bandwidth_bytes_per_second / step_bytes,
    }
