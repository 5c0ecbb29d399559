"""Configuration of the ChatGLM2 architecture, shared by the GLM 6B family.

Attribute names and defaults follow the released ChatGLM2-6B `config.json`, which fine-tuning
scripts and inference engines read directly; aliases give transformers' generic utilities
(caches, device maps) the names they expect. The same class loads the `config.json` of
chatglm2-6b, chatglm2-6b-32k, chatglm3-6b (-base, -32k, -128k) and codegeex2-6b unchanged.
"""

import re

from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

# --- transformers 4.57 / 5.x ---
# 5.x renamed the cache field of model outputs (and the cache argument of `forward` and `generate`)
# from `past_key_values` to `cache`. The model reads and writes whichever this version declares.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# What `rope_ratio` scales (see `ChatGLMConfig`): the position ids, or the rotary base.
ROPE_RATIO_TARGETS = ("positions", "base")

# The released configs do not say what their `rope_ratio` means; only the code beside them did.
# Every chatglm2/codegeex2 release divides positions by it (chatglm2-6b-32k, ratio 16); every
# chatglm3 release multiplies the base (chatglm3-6b-32k, 50; chatglm3-6b-128k, 500). Their
# config.json files carry `_name_or_path` ("THUDM/chatglm2-6b-32k", ...), which tells them apart.
# The pattern is matched against the last component of that path.
RELEASE_ROPE_RATIO_TARGETS = (
    (re.compile(r"^(chatglm2|codegeex2)", re.IGNORECASE), "positions"),
    (re.compile(r"^chatglm3", re.IGNORECASE), "base"),
)


class ChatGLMConfig(PretrainedConfig):
    """The ChatGLM2 architecture's settings, named as in the released `config.json`.

    Rotary position embedding (the model rotates adjacent pairs of the first half of each head, at
    angle `position * base ** (-2i / rotary_dim)`, base 10000):

    - `rope_ratio` (default 1: no scaling) stretches the rotary embedding over longer contexts.
      The releases used it in two opposite ways, and `rope_ratio_applies_to` says which:
    - `rope_ratio_applies_to`:
        - `"positions"`: linear position interpolation, the angle is
          `(position / rope_ratio) * 10000 ** (-2i / rotary_dim)` (chatglm2-6b-32k, ratio 16);
        - `"base"`: the base is scaled, the angle is
          `position * (10000 * rope_ratio) ** (-2i / rotary_dim)` (chatglm3-6b-32k, ratio 50, and
          chatglm3-6b-128k, ratio 500);
        - `None` (default): only allowed with `rope_ratio` 1, where both are the same.
      When a config sets `rope_ratio` but not this field, as every released one does, it is
      inferred from the release named by `_name_or_path`: chatglm2-* and codegeex2-* mean
      `"positions"`, chatglm3-* means `"base"`. Any other name is refused with an error asking for
      this field, rather than guessed: a wrong guess still runs, and quietly computes another model.
      The inferred value is stored, so a saved config states it.

    CodeGeeX2-6B's `config.json` adds `rotary_percent: 0.5` and `interleaved_qkv: false`, read by
    none of its code: they describe this architecture (half of each head rotated; the fused QKV
    projection laid out `[all q | all k | all v]` rather than interleaved per head). They load as
    attributes, and any other value is refused, since no code computes it. Its bfloat16 `RMSNorm`
    skipped the float32 upcast; this package upcasts for every model: the published function
    computed the float32 norm too until its fix of 2023-08-09 (the bfloat16 branch was dead code
    before), the upcast is the more exact of the two, and the norm is a negligible cost.
    """

    model_type = "chatglm"
    # Not in the release: how the CPU computes (quantization.CPU_KERNELS; None: "auto") the quantized layers
    # and, with "chatglm_cpu", the float output layer and decode attention. A class attribute, so that a config
    # saves it only once chosen (`quantize(..., cpu_kernel=...)`, or `from_pretrained(path,
    # quantization_cpu_kernel="torch")` at load) and config.json otherwise stays as released.
    quantization_cpu_kernel = None
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
        rope_ratio=1,
        rope_ratio_applies_to=None,
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
        self.rope_ratio = rope_ratio
        if rope_ratio_applies_to is None and _is_number(rope_ratio) and rope_ratio != 1:
            rope_ratio_applies_to = _release_rope_ratio_target(kwargs.get("_name_or_path", kwargs.get("name_or_path")))
        self.rope_ratio_applies_to = rope_ratio_applies_to
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self._validate()

    @property
    def num_key_value_heads(self):
        """Heads in the KV cache: the query groups with multi-query attention, else all heads."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    def _validate_rotary(self):
        if not _is_number(self.rope_ratio) or not self.rope_ratio > 0:
            raise ValueError(f"ChatGLMConfig.rope_ratio must be a positive number, got {self.rope_ratio!r}")
        target = self.rope_ratio_applies_to
        if target is not None and target not in ROPE_RATIO_TARGETS:
            raise ValueError(
                f"ChatGLMConfig.rope_ratio_applies_to must be None, 'positions' or 'base', got {target!r}"
            )
        if target is None and self.rope_ratio != 1:
            raise ValueError(
                f"ChatGLMConfig.rope_ratio_applies_to must be set: rope_ratio is {self.rope_ratio} and "
                f"_name_or_path {self._name_or_path!r} is not a release whose code says what it scales. Set "
                f"'positions' to divide the position ids by it (as chatglm2-6b-32k) or 'base' to multiply "
                f"the rotary base by it (as chatglm3-6b-32k/128k)"
            )
        # CodeGeeX2-6B's keys, read by no published code: only the values describing this architecture.
        rotary_percent = getattr(self, "rotary_percent", 0.5)
        if rotary_percent != 0.5:
            raise ValueError(
                f"ChatGLMConfig.rotary_percent must be 0.5 (this architecture rotates half of each head), "
                f"got {rotary_percent!r}"
            )
        if getattr(self, "interleaved_qkv", False) is not False:
            raise ValueError(
                f"ChatGLMConfig.interleaved_qkv must be false (the fused QKV weight is laid out "
                f"[all q | all k | all v]), got {self.interleaved_qkv!r}"
            )

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
        self._validate_rotary()
        for name in ("quantization_bit", "output_layer_quantization_bit"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in (0, 4, 8):
                raise ValueError(f"ChatGLMConfig.{name} must be 0, 4 or 8, got {value!r}")
        if self.pre_seq_len is not None and (
            isinstance(self.pre_seq_len, bool) or not isinstance(self.pre_seq_len, int) or self.pre_seq_len < 1
        ):
            raise ValueError(f"ChatGLMConfig.pre_seq_len must be None or an integer >= 1, got {self.pre_seq_len!r}")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _release_rope_ratio_target(name_or_path):
    """`rope_ratio_applies_to` of the release named by `_name_or_path` (a hub id or folder), or None."""
    name = re.split(r"[\\/]", str(name_or_path or "").rstrip("/\\"))[-1]
    for pattern, target in RELEASE_ROPE_RATIO_TARGETS:
        if pattern.match(name):
            return target
    return None
