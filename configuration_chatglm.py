"""Configuration of the ChatGLM2 architecture.

Attribute names and defaults follow the released ChatGLM2-6B `config.json`, which fine-tuning
scripts and inference engines read directly; aliases give transformers' generic utilities
(caches, device maps) the names they expect.
"""

from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

# --- transformers 4.57 / 5.x ---
# 5.x renamed the cache field of model outputs (and the cache argument of `forward` and `generate`)
# from `past_key_values` to `cache`. The model reads and writes whichever this version declares.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    # Output keys that Trainer.evaluate/predict leave out of the predictions: the KV cache.
    keys_to_ignore_at_inference = [CACHE_FIELD]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "vocab_size": "padded_vocab_size",
        "intermediate_size": "ffn_hidden_size",
        "head_dim": "kv_channels",
        "layer_norm_eps": "layernorm_epsilon",
        "max_position_embeddings": "seq_length",
    }

    def __init__(
        self,
        num_layers=28,
        padded_vocab_size=65024,
        hidden_size=4096,
        ffn_hidden_size=13696,
        kv_channels=128,
        num_attention_heads=32,
        seq_length=2048,
        hidden_dropout=0.0,
        classifier_dropout=None,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
        rmsnorm=True,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        bias_dropout_fusion=True,
        multi_query_attention=False,
        multi_query_group_num=1,
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        fp32_residual_connection=False,
        quantization_bit=0,
        output_layer_quantization_bit=0,
        pre_seq_len=None,
        prefix_projection=False,
        original_rope=True,
        use_cache=True,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.classifier_dropout = classifier_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.quantization_bit = quantization_bit
        # Not in the release: `quantize(bits, output_layer_bits=...)` sets it (opt-in).
        self.output_layer_quantization_bit = output_layer_quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.original_rope = original_rope
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self._validate()

    @property
    def num_key_value_heads(self):
        """Heads in the KV cache: the query groups with multi-query attention, else all heads."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    def _validate(self):
        positive = (
            "num_layers",
            "padded_vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "kv_channels",
            "num_attention_heads",
            "seq_length",
            "multi_query_group_num",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ChatGLMConfig.{name} must be a positive integer, got {value!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ChatGLMConfig.{name} must be in [0, 1), got {value!r}")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(
                f"ChatGLMConfig.classifier_dropout must be None or in [0, 1), got {self.classifier_dropout!r}"
            )
        if self.layernorm_epsilon <= 0:
            raise ValueError(f"ChatGLMConfig.layernorm_epsilon must be positive, got {self.layernorm_epsilon!r}")
        if self.kv_channels % 4 != 0:
            raise ValueError(
                f"ChatGLMConfig.kv_channels must be a multiple of 4 (half of each head is rotated in pairs), "
                f"got {self.kv_channels}"
            )
        if self.multi_query_attention and self.num_attention_heads % self.multi_query_group_num != 0:
            raise ValueError(
                f"ChatGLMConfig.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"multi_query_group_num ({self.multi_query_group_num})"
            )
        for name in ("quantization_bit", "output_layer_quantization_bit"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in (0, 4, 8):
                raise ValueError(f"ChatGLMConfig.{name} must be 0, 4 or 8, got {value!r}")
        if self.pre_seq_len is not None and (
            isinstance(self.pre_seq_len, bool) or not isinstance(self.pre_seq_len, int) or self.pre_seq_len < 1
        ):
            raise ValueError(f"ChatGLMConfig.pre_seq_len must be None or an integer >= 1, got {self.pre_seq_len!r}")
