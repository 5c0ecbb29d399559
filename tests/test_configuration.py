"""ChatGLMConfig: the attribute names and defaults of spec §1, the released config.json, validation.

Loaded through `AutoConfig.from_pretrained(folder, trust_remote_code=True)` from a folder holding the
repository's files, as users load it.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoConfig

from tiny_checkpoint import REPO_ROOT

# Spec §1: attribute -> class default.
CLASS_DEFAULTS = {
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "seq_length": 2048,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "classifier_dropout": None,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "bias_dropout_fusion": True,
    "multi_query_attention": False,
    "multi_query_group_num": 1,
    "apply_query_key_layer_scaling": True,
    "attention_softmax_in_fp32": True,
    "fp32_residual_connection": False,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "prefix_projection": False,
    "output_layer_quantization_bit": 0,  # ours, opt-in: the release keeps output_layer in floating point
}

# Spec §1: the values of the 6B config.json where they differ from the class defaults.
RELEASED_VALUES = {
    **CLASS_DEFAULTS,
    "seq_length": 32768,
    "add_qkv_bias": True,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
}

RELEASED_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}


@pytest.fixture
def config_dir(tmp_path):
    for name in ("configuration_chatglm.py", "config.json"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    return tmp_path


def load_config(folder, **kwargs):
    return AutoConfig.from_pretrained(folder, trust_remote_code=True, **kwargs)


def config_class(folder):
    return type(load_config(folder))


def test_class_defaults_are_those_of_the_spec(config_dir):
    config = config_class(config_dir)()
    assert config.model_type == "chatglm"
    for name, value in CLASS_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.tie_word_embeddings is False


def test_released_config_json_loads_unchanged_with_the_6b_values(config_dir):
    config = load_config(config_dir)
    for name, value in RELEASED_VALUES.items():
        assert getattr(config, name) == value, name
    assert config.original_rope is True
    assert config.use_cache is True
    assert config.tie_word_embeddings is False
    assert (config.eos_token_id, config.pad_token_id) == (2, 0)
    assert config.architectures == ["ChatGLMModel"]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # 5.x renamed it
    assert dtype in (torch.float16, "float16")
    raw = json.loads((config_dir / "config.json").read_text())
    assert raw["auto_map"] == RELEASED_AUTO_MAP
    assert raw["torch_dtype"] == "float16"


def test_generic_names_mirror_the_released_attributes(config_dir):
    config = load_config(config_dir)
    assert config.vocab_size == config.padded_vocab_size == 65024
    assert config.num_hidden_layers == 28
    assert config.head_dim == 128
    assert config.intermediate_size == 13696
    assert config.max_position_embeddings == 32768
    assert config.num_key_value_heads == 2
    no_multi_query = config_class(config_dir)(multi_query_attention=False, num_attention_heads=8)
    assert no_multi_query.num_key_value_heads == 8


def test_save_and_reload_round_trips_every_attribute(config_dir, tmp_path):
    config = load_config(config_dir, pre_seq_len=16, prefix_projection=True, quantization_bit=4)
    saved = tmp_path / "saved"
    config.save_pretrained(saved)
    shutil.copy(REPO_ROOT / "configuration_chatglm.py", saved / "configuration_chatglm.py")
    reloaded = load_config(saved)
    def attributes(loaded):
        return {key: value for key, value in loaded.to_dict().items() if key != "_name_or_path"}

    assert attributes(reloaded) == attributes(config)
    assert (reloaded.pre_seq_len, reloaded.prefix_projection, reloaded.quantization_bit) == (16, True, 4)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"multi_query_attention": True, "num_attention_heads": 32, "multi_query_group_num": 3}, "multi_query_group_num"),
        ({"quantization_bit": 2}, "quantization_bit"),
        ({"quantization_bit": 16}, "quantization_bit"),
        ({"quantization_bit": True}, "quantization_bit"),
        ({"output_layer_quantization_bit": 2}, "output_layer_quantization_bit"),
        ({"pre_seq_len": 0}, "pre_seq_len"),
        ({"pre_seq_len": 2.5}, "pre_seq_len"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_layers": -1}, "num_layers"),
        ({"kv_channels": 6}, "kv_channels"),
        ({"seq_length": 1.5}, "seq_length"),
        ({"num_attention_heads": True}, "num_attention_heads"),
        ({"hidden_dropout": 1.0}, "hidden_dropout"),
        ({"classifier_dropout": -0.1}, "classifier_dropout"),
        ({"layernorm_epsilon": 0.0}, "layernorm_epsilon"),
    ],
)
def test_invalid_values_are_refused_naming_the_attribute(config_dir, overrides, named):
    cls = config_class(config_dir)
    with pytest.raises(ValueError, match=named):
        cls(**overrides)


def test_invalid_value_in_config_json_is_refused_at_load(config_dir):
    raw = json.loads((config_dir / "config.json").read_text())
    raw["multi_query_group_num"] = 5
    (config_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="multi_query_group_num"):
        load_config(config_dir)
