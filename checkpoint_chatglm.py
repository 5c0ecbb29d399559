"""What a ChatGLM2 checkpoint folder stores, read before transformers loads it.

`from_pretrained` refuses, naming the tensor, a folder whose projection weights do not match the
quantization settings of the config it would build: transformers would otherwise cast a float weight into
an int8 parameter (4.57) or fail with a generic size-mismatch report (5.x).
"""

import re
from pathlib import Path

import torch
from safetensors import safe_open

from .compat_chatglm import is_chatglm_config
from .configuration_chatglm import ChatGLMConfig
from .quantization import check_stored_weight, quantized_projection

SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
}
OUTPUT_LAYER_WEIGHT = re.compile(r"(?:^|\.)output_layer\.weight$")
QUANTIZATION_SETTINGS = ("quantization_bit", "output_layer_quantization_bit")


def projection_shapes(config):
    """(out_features, in_features) of each of a layer's four projections, the ones quantization replaces;
    the layers size themselves from it and checkpoint checks compare stored tensors with it."""
    heads_size = config.num_attention_heads * config.kv_channels
    qkv_size = heads_size + 2 * config.num_key_value_heads * config.kv_channels
    return {
        "self_attention.query_key_value": (qkv_size, config.hidden_size),
        "self_attention.dense": (config.hidden_size, heads_size),
        "mlp.dense_h_to_4h": (2 * config.ffn_hidden_size, config.hidden_size),
        "mlp.dense_4h_to_h": (config.hidden_size, config.ffn_hidden_size),
    }


def unreadable_weights(path, error):
    return OSError(f"{path}: cannot read its weights, the file is truncated or corrupt ({error})")


def stored_tensors(folder):
    """(file name, key, dtype, shape) of the weights transformers would load from `folder`, read lazily.

    A file that cannot be read raises OSError naming it (the readers' own errors do not).
    """
    safetensors_files = sorted(folder.glob("model*.safetensors"))
    if safetensors_files:
        for path in safetensors_files:
            try:
                file = safe_open(path, framework="pt")
            except Exception as error:
                raise unreadable_weights(path, error) from None
            with file:
                for key in file.keys():
                    piece = file.get_slice(key)
                    yield path.name, key, SAFETENSORS_DTYPES.get(piece.get_dtype()), tuple(piece.get_shape())
        return
    for path in sorted(folder.glob("pytorch_model*.bin")):
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:
            raise unreadable_weights(path, error) from None
        for key, tensor in state.items():
            yield path.name, key, tensor.dtype, tuple(tensor.shape)


def config_to_load(folder, load_kwargs):
    """The config `from_pretrained(folder, **load_kwargs)` builds: the one given, else the folder's, with
    the quantization settings given as keywords."""
    config = load_kwargs.get("config")
    if not is_chatglm_config(config):
        config = ChatGLMConfig.from_pretrained(folder)
    overrides = {name: load_kwargs[name] for name in QUANTIZATION_SETTINGS if name in load_kwargs}
    if overrides:
        config = ChatGLMConfig.from_dict({**config.to_dict(), **overrides})
    return config


def check_checkpoint_quantization(folder, config):
    """Refuse, naming the tensor, a checkpoint whose projections do not match `config.quantization_bit`
    (or whose `output_layer` does not match `config.output_layer_quantization_bit`)."""
    shapes = projection_shapes(config)
    for file_name, key, dtype, shape in stored_tensors(Path(folder)):
        if dtype is None:
            continue
        projection = quantized_projection(key)
        if projection:
            out_features, in_features = shapes[projection]
            check_stored_weight(f"{file_name}: {key}", dtype, shape, out_features, in_features, config.quantization_bit)
        elif OUTPUT_LAYER_WEIGHT.search(key):
            check_stored_weight(
                f"{file_name}: {key}",
                dtype,
                shape,
                config.padded_vocab_size,
                config.hidden_size,
                config.output_layer_quantization_bit,
                setting="output_layer_quantization_bit",
            )
