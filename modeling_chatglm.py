"""The ChatGLM2 network, its generation helpers (`chat`, `stream_chat`) and its task heads.

Module and parameter names match the released ChatGLM2-6B checkpoints, so the published weights load
unchanged. Attention runs through transformers' attention interface (SDPA by default, `eager` on request)
and the KV cache is a transformers `Cache` holding only the key/value groups of multi-query attention.
"""

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_chatglm import ChatGLMConfig
from .quantization import check_stored_weight, quantize_model, quantize_output_layer, quantized_projection, set_cpu_kernel

logger = logging.get_logger(__name__)

# transformers 5.x renamed the cache field of its model outputs from `past_key_values` to `cache`
# (and passes `cache=` to `forward` during generation); use whichever this version declares.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

INITIALIZER_STD = 0.02
PREFIX_DROPOUT = 0.1


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight.float() * hidden_states).to(input_dtype)


def make_norm(config, device=None, dtype=None):
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=dtype)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=dtype)


def rotary_inverse_frequencies(rotary_dim, device=None):
    return 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


class RotaryEmbedding(nn.Module):
    """Angles for the ChatGLM2 rotary embedding, which rotates only the first half of each head.

    `inv_freq` is a persistent buffer because the released checkpoints store it.
    """

    def __init__(self, rotary_dim, device=None):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.register_buffer("inv_freq", rotary_inverse_frequencies(rotary_dim, device=device), persistent=True)

    def forward(self, position_ids, dtype):
        # Positions, angles and cos/sin in float32; only the finished tables are rounded to the
        # model dtype (float16 positions would already be wrong above 2048).
        angles = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_pos_emb(states, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the first `2 * cos.shape[-1]` dims of each head.

    `states` is [batch, heads, seq, head_dim]; `cos`/`sin` are [batch, seq, rotary_dim / 2].
    """
    rotary_dim = cos.shape[-1] * 2
    rotated, passed = states[..., :rotary_dim], states[..., rotary_dim:]
    pairs = rotated.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, passed), dim=-1)


def repeat_kv(states, repeats):
    """[batch, groups, seq, dim] -> [batch, groups * repeats, seq, dim], query head h reading group h // repeats."""
    if repeats == 1:
        return states
    batch, groups, seq, dim = states.shape
    return states[:, :, None].expand(batch, groups, repeats, seq, dim).reshape(batch, groups * repeats, seq, dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention with a float32 softmax; returns ([batch, seq, heads, dim], probabilities).

    In float16 the scores are computed divided by the layer number and multiplied back in float32
    (`apply_query_key_layer_scaling`): the same result, without overflowing half precision.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    coefficient = module.layer_number if module.query_key_layer_scaling and query.dtype == torch.float16 else 1
    scores = torch.matmul(query * (scaling / coefficient), key.transpose(2, 3)).float() * coefficient
    if attention_mask is None:
        query_length, key_length = scores.shape[-2:]
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=scores.device).tril(
            key_length - query_length
        )
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class SelfAttention(nn.Module):
    is_causal = True

    def __init__(self, config, layer_number, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.layer_number = max(1, layer_number)
        self.layer_idx = layer_number - 1
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.multi_query_attention = config.multi_query_attention
        self.query_key_layer_scaling = config.apply_query_key_layer_scaling
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        projection_size = self.num_heads * self.head_dim
        qkv_size = projection_size + 2 * self.num_key_value_heads * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size,
            qkv_size,
            bias=config.add_bias_linear or config.add_qkv_bias,
            device=device,
            dtype=dtype,
        )
        self.dense = nn.Linear(projection_size, config.hidden_size, bias=config.add_bias_linear, device=device, dtype=dtype)

    def split_heads(self, mixed):
        """Fused QKV output [batch, seq, qkv] -> query, key, value as [batch, heads, seq, head_dim]."""
        batch, seq, _ = mixed.shape
        if self.multi_query_attention:
            kv_size = self.num_key_value_heads * self.head_dim
            query, key, value = mixed.split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
            query = query.view(batch, seq, self.num_heads, self.head_dim)
            key = key.view(batch, seq, self.num_key_value_heads, self.head_dim)
            value = value.view(batch, seq, self.num_key_value_heads, self.head_dim)
        else:
            # Without multi-query attention the release groups the outputs per head: [q | k | v] per head.
            query, key, value = mixed.view(batch, seq, self.num_heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def forward(self, hidden_states, rotary, attention_mask, cache=None, prefix=None, output_attentions=False):
        query, key, value = self.split_heads(self.query_key_value(hidden_states))
        cos, sin = rotary
        query = apply_rotary_pos_emb(query, cos, sin)
        key = apply_rotary_pos_emb(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if prefix is not None:
            key = torch.cat((prefix[0].to(key.dtype), key), dim=2)
            value = torch.cat((prefix[1].to(value.dtype), value), dim=2)

        implementation = self.config._attn_implementation
        if output_attentions or implementation in (None, "eager"):
            attention = eager_attention_forward
        else:
            attention = ALL_ATTENTION_FUNCTIONS[implementation]
        context, probs = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
        )
        output = self.dense(context.reshape(*hidden_states.shape[:-1], -1))
        return output, probs


class MLP(nn.Module):
    """SwiGLU: `dense_h_to_4h` yields [a | b]; `silu(a) * b` goes into `dense_4h_to_h`."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(
            config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear, device=device, dtype=dtype
        )
        self.dense_4h_to_h = nn.Linear(
            config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear, device=device, dtype=dtype
        )

    def forward(self, hidden_states):
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config, layer_number, device=None, dtype=None):
        super().__init__()
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.fp32_residual_connection = config.fp32_residual_connection
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = make_norm(config, device=device, dtype=dtype)
        self.self_attention = SelfAttention(config, layer_number, device=device, dtype=dtype)
        self.post_attention_layernorm = make_norm(config, device=device, dtype=dtype)
        self.mlp = MLP(config, device=device, dtype=dtype)

    def forward(self, hidden_states, rotary, attention_mask, cache=None, prefix=None, output_attentions=False):
        normed = self.input_layernorm(hidden_states)
        attention_output, probs = self.self_attention(
            normed, rotary, attention_mask, cache=cache, prefix=prefix, output_attentions=output_attentions
        )
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        hidden_states = residual + F.dropout(attention_output, p=self.hidden_dropout, training=self.training)

        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        hidden_states = residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)
        return hidden_states, probs


class GLMTransformer(nn.Module):
    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.gradient_checkpointing = False
        self.layers = nn.ModuleList(
            [GLMBlock(config, number, device=device, dtype=dtype) for number in range(1, config.num_layers + 1)]
        )
        self.final_layernorm = make_norm(config, device=device, dtype=dtype) if config.post_layer_norm else None

    def forward(
        self,
        hidden_states,
        rotary,
        attention_mask,
        cache=None,
        prefixes=None,
        output_attentions=False,
        output_hidden_states=False,
    ):
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            prefix = prefixes[index] if prefixes is not None else None
            if self.gradient_checkpointing and self.training:
                hidden_states, probs = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, rotary, attention_mask, cache, prefix, output_attentions
                )
            else:
                hidden_states, probs = layer(
                    hidden_states, rotary, attention_mask, cache=cache, prefix=prefix, output_attentions=output_attentions
                )
            if output_attentions:
                all_attentions += (probs,)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states, all_attentions


class Embedding(nn.Module):
    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.fp32_residual_connection = config.fp32_residual_connection
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device, dtype=dtype)

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)
        return embeddings.float() if self.fp32_residual_connection else embeddings


class PrefixEncoder(nn.Module):
    """P-Tuning v2: `pre_seq_len` learned positions turned into a key/value prefix for every layer."""

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * 2 * config.num_key_value_heads * config.kv_channels
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if self.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )

    def forward(self, prefix_tokens):
        prefix = self.embedding(prefix_tokens)
        return self.trans(prefix) if self.prefix_projection else prefix


def attention_mask_for(padding_mask, batch, query_length, past_length, prefix_length, device):
    """Boolean mask [batch, 1, query, prefix + past + query] (True = attend), or None for plain causal.

    `padding_mask` is [batch, past + query] with 0 at (left) padding. The prefix is always visible.
    A padding query still attends to itself so that its row never becomes all-masked (which would
    produce NaN that travels through the values).
    """
    has_padding = padding_mask is not None and not bool(padding_mask.all())
    if not has_padding and prefix_length == 0 and (query_length == 1 or past_length == 0):
        return None
    key_length = past_length + query_length
    query_positions = torch.arange(past_length, key_length, device=device)
    key_positions = torch.arange(key_length, device=device)
    mask = key_positions[None, :] <= query_positions[:, None]
    mask = mask.expand(batch, query_length, key_length)
    if has_padding:
        diagonal = key_positions[None, :] == query_positions[:, None]
        mask = (mask & padding_mask[:, None, :].to(device=device, dtype=torch.bool)) | diagonal
    if prefix_length:
        mask = torch.cat((mask.new_ones(batch, query_length, prefix_length), mask), dim=-1)
    return mask[:, None]


def positions_from_mask(padding_mask):
    """0..n-1 over the real tokens of each row; left padding gets 0 (as the tokenizer returns)."""
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


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
    """(out_features, in_features) of each quantizable projection."""
    heads_size = config.num_attention_heads * config.kv_channels
    qkv_size = heads_size + 2 * config.num_key_value_heads * config.kv_channels
    return {
        "self_attention.query_key_value": (qkv_size, config.hidden_size),
        "self_attention.dense": (config.hidden_size, heads_size),
        "mlp.dense_h_to_4h": (2 * config.ffn_hidden_size, config.hidden_size),
        "mlp.dense_4h_to_h": (config.hidden_size, config.ffn_hidden_size),
    }


def stored_tensors(folder):
    """(file name, key, dtype, shape) of the weights transformers would load from `folder`, read lazily."""
    safetensors_files = sorted(folder.glob("model*.safetensors"))
    if safetensors_files:
        for path in safetensors_files:
            with safe_open(path, framework="pt") as file:
                for key in file.keys():
                    piece = file.get_slice(key)
                    yield path.name, key, SAFETENSORS_DTYPES.get(piece.get_dtype()), tuple(piece.get_shape())
        return
    for path in sorted(folder.glob("pytorch_model*.bin")):
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        for key, tensor in state.items():
            yield path.name, key, tensor.dtype, tuple(tensor.shape)


def check_checkpoint_quantization(folder, config):
    """Refuse, naming the tensor, a checkpoint whose projections do not match `config.quantization_bit`
    (or whose `output_layer` does not match `config.output_layer_quantization_bit`).

    transformers would otherwise cast a float weight into an int8 parameter (4.x) or fail with a
    generic size-mismatch report (5.x).
    """
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


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    is_parallelizable = False
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INITIALIZER_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INITIALIZER_STD)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(rotary_inverse_frequencies(module.rotary_dim, device=module.inv_freq.device))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if Path(pretrained_model_name_or_path).is_dir():
            # transformers 5.x imports the config class from its own module copy, so test by attribute.
            config = kwargs.get("config")
            if not hasattr(config, "quantization_bit"):
                config = ChatGLMConfig.from_pretrained(pretrained_model_name_or_path)
            overrides = {name: kwargs[name] for name in QUANTIZATION_SETTINGS if name in kwargs}
            if overrides:
                config = ChatGLMConfig.from_dict({**config.to_dict(), **overrides})
            check_checkpoint_quantization(pretrained_model_name_or_path, config)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # transformers 5.x re-creates loaded parameters as trainable; P-Tuning v2 needs the base frozen.
        if model.config.pre_seq_len is not None:
            model.base_model.freeze_all_but_prefix()
        return loaded

    def quantize(self, bits, empty_init=False, device=None, output_layer_bits=0, cpu_kernel=None, **kwargs):
        """Quantize the four projection matrices of every layer to `bits` (4 or 8) in place; returns the model.

        `bits=0` and a second call are no-ops. With `device`, each layer moves there before it is
        quantized, so `.quantize(4, device="cuda")` never holds the float model on the GPU.

        `output_layer_bits` (4 or 8; opt-in, not in the release) also quantizes `output_layer`, the
        vocabulary projection: at 8 bits it halves the 533 MB every 6B decode step reads there.
        Checkpoints saved with it record `output_layer_quantization_bit` and load only with this code.

        `cpu_kernel` ("torch", the default, or "onnxruntime": int8 activations, faster; see
        quantization.CPU_KERNELS) chooses how quantized layers compute on the CPU; it is saved
        in the config as `quantization_cpu_kernel`.
        """
        for setting, requested in (("quantization_bit", bits), ("output_layer_quantization_bit", output_layer_bits)):
            current = getattr(self.config, setting)
            if requested and current and current != requested:
                raise ValueError(
                    f"the model is already quantized to {current} bits ({setting}); cannot re-quantize to {requested}"
                )
        if bits and not self.config.quantization_bit:
            quantize_model(self.base_model, bits, empty_init=empty_init, device=device)
            self.config.quantization_bit = bits
        if output_layer_bits and not self.config.output_layer_quantization_bit:
            quantize_output_layer(self.base_model, output_layer_bits, empty_init=empty_init, device=device)
            self.config.output_layer_quantization_bit = output_layer_bits
        if cpu_kernel is not None:
            self.config.quantization_cpu_kernel = cpu_kernel
        set_cpu_kernel(self, getattr(self.config, "quantization_cpu_kernel", "torch"))
        return self


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding, the GLM blocks and the final norm; also holds `output_layer`, where the release keeps it."""

    def __init__(self, config, empty_init=True, device=None):
        # `empty_init` and `device` are the published constructor's arguments, accepted so that scripts
        # passing them keep working; transformers itself decides how weights are materialised.
        super().__init__(config)
        self.embedding = Embedding(config, device=device)
        self.num_layers = config.num_layers
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels // 2, device=device)
        self.encoder = GLMTransformer(config, device=device)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.freeze_all_but_prefix()
        if config.quantization_bit:
            quantize_model(self, config.quantization_bit, empty_init=True)
        if config.output_layer_quantization_bit:
            quantize_output_layer(self, config.output_layer_quantization_bit, empty_init=True)
        set_cpu_kernel(self, getattr(config, "quantization_cpu_kernel", "torch"))
        self.post_init()

    def freeze_all_but_prefix(self):
        """P-Tuning v2 trains the prefix encoder alone."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad = name.startswith("prefix_encoder.")

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def prefix_key_values(self, batch, device, dtype):
        """Per layer (key, value) of shape [batch, kv_heads, pre_seq_len, head_dim] from the prefix encoder."""
        config = self.config
        tokens = torch.arange(self.pre_seq_len, device=device).expand(batch, -1)
        prefix = self.prefix_encoder(tokens).to(dtype)
        prefix = prefix.view(
            batch, self.pre_seq_len, config.num_layers * 2, config.num_key_value_heads, config.kv_channels
        )
        prefix = F.dropout(prefix, p=PREFIX_DROPOUT, training=self.training)
        prefix = prefix.permute(2, 0, 3, 1, 4)
        return [(prefix[2 * layer], prefix[2 * layer + 1]) for layer in range(config.num_layers)]

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        if self.encoder.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("the KV cache is not used with gradient checkpointing in training; use_cache=False")
            use_cache = False
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(
                f"`past_key_values` must be a transformers Cache (e.g. DynamicCache) as returned by this model, "
                f"got {type(cache).__name__}"
            )

        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch, query_length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if use_cache and cache is None:
            cache = DynamicCache()
        past_length = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None and attention_mask.shape[-1] != past_length + query_length:
            raise ValueError(
                f"`attention_mask` covers {attention_mask.shape[-1]} tokens but the cache holds {past_length} "
                f"and the input {query_length}; it must cover both ({past_length + query_length})"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, -query_length:]
            else:
                position_ids = torch.arange(past_length, past_length + query_length, device=device).expand(batch, -1)

        prefixes = None
        prefix_length = 0
        if self.pre_seq_len is not None:
            prefixes = self.prefix_key_values(batch, device, inputs_embeds.dtype)
            prefix_length = self.pre_seq_len
        mask = attention_mask_for(attention_mask, batch, query_length, past_length, prefix_length, device)
        rotary = self.rotary_pos_emb(position_ids.to(device), inputs_embeds.dtype)

        hidden_states, all_hidden_states, all_attentions = self.encoder(
            inputs_embeds,
            rotary,
            mask,
            cache=cache if use_cache else None,
            prefixes=prefixes,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: cache},
        )


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """Replace scores holding NaN/inf by a distribution on token 5, so that sampling never crashes."""

    def __call__(self, input_ids, scores):
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., 5] = 5e4
        return scores


def process_response(response):
    return response.strip().replace("[[训练时间]]", "2023年")


def check_chat_arguments(query, history):
    if not isinstance(query, str):
        raise TypeError(f"`query` must be a str, got {type(query).__name__}")
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"`history` must be a list of (query, response) pairs, got {type(history).__name__}")
    for index, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not all(isinstance(text, str) for text in turn):
            raise ValueError(f"`history[{index}]` must be a (query, response) pair of strings, got {turn!r}")
    return [tuple(turn) for turn in history]


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    def __init__(self, config, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.seq_length
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        return_last_logit=False,
        logits_to_keep=0,
        **kwargs,
    ):
        """Logits (and, with `labels`, the shifted cross-entropy; -100 is ignored).

        `logits_to_keep=n` computes logits for the last n positions only (`return_last_logit` is the
        published spelling of n=1): the vocabulary projection dominates prefill cost otherwise.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if return_last_logit:
            logits_to_keep = 1
        if labels is not None and logits_to_keep:
            raise ValueError("`labels` need the logits of every position; do not combine them with logits_to_keep")
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.transformer.output_layer(hidden_states)

        loss = None
        if labels is not None:
            shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shifted_labels = labels[:, 1:].to(logits.device).reshape(-1)
            if num_items_in_batch is None:
                loss = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)
            else:
                loss = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)

        cache = getattr(outputs, CACHE_FIELD)
        if not return_dict:
            output = tuple(v for v in (logits, cache, outputs.hidden_states, outputs.attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: cache},
        )

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' preparation, with position ids continued by +1 per generated token.

        Positions come from the `position_ids` given to `generate` (as the tokenizer returns them),
        extended past the prompt; without them, from the attention mask. transformers 4.x does not
        extend user-given position ids itself, and versions differ in whether they derive them.
        """
        given_positions = kwargs.pop("position_ids", None)
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        step_input = model_inputs.get("input_ids")
        if step_input is None:
            step_input = model_inputs["inputs_embeds"]
        step_length = step_input.shape[1]
        padding_mask = kwargs.get("attention_mask")
        cache = model_inputs.get(CACHE_FIELD, model_inputs.get("past_key_values"))
        past_length = cache.get_seq_length() if isinstance(cache, Cache) else 0
        total_length = past_length + step_length
        if given_positions is not None:
            known = given_positions.shape[-1]
            if known >= total_length:
                positions = given_positions[:, :total_length]
            else:
                steps = torch.arange(1, total_length - known + 1, device=given_positions.device)
                positions = torch.cat((given_positions, given_positions[:, -1:] + steps), dim=-1)
        elif padding_mask is not None and padding_mask.dim() == 2:
            positions = positions_from_mask(padding_mask[:, :total_length])
        else:
            positions = torch.arange(total_length, device=step_input.device).expand(step_input.shape[0], -1)
        model_inputs["position_ids"] = positions[:, -step_length:].contiguous()
        return model_inputs

    def _check_prompt(self, prompt_length, max_length):
        if prompt_length > self.config.seq_length:
            raise ValueError(
                f"the prompt has {prompt_length} tokens, more than the model's seq_length ({self.config.seq_length}); "
                f"shorten the query or the history"
            )
        if max_length is not None and prompt_length >= max_length:
            raise ValueError(
                f"the prompt has {prompt_length} tokens, which leaves no room under max_length={max_length}; "
                f"raise max_length or shorten the history"
            )

    @staticmethod
    def _sampling_arguments(do_sample, top_p, temperature):
        return {"do_sample": True, "top_p": top_p, "temperature": temperature} if do_sample else {"do_sample": False}

    @torch.inference_mode()
    def chat(
        self,
        tokenizer,
        query,
        history=None,
        max_length=8192,
        num_beams=1,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        logits_processor=None,
        **kwargs,
    ):
        """One chat turn: returns (response, history with (query, response) appended)."""
        history = check_chat_arguments(query, history)
        logits_processor = LogitsProcessorList(logits_processor or [])
        logits_processor.append(InvalidScoreLogitsProcessor())
        inputs = tokenizer([tokenizer.build_prompt(query, history)], return_tensors="pt").to(self.device)
        prompt_length = inputs["input_ids"].shape[1]
        length_limit = {} if "max_new_tokens" in kwargs else {"max_length": max_length}
        self._check_prompt(prompt_length, length_limit.get("max_length"))
        outputs = self.generate(
            **inputs,
            **length_limit,
            num_beams=num_beams,
            logits_processor=logits_processor,
            **self._sampling_arguments(do_sample, top_p, temperature),
            **kwargs,
        )
        response = process_response(tokenizer.decode(outputs[0, prompt_length:].tolist()))
        return response, history + [(query, response)]

    @torch.inference_mode()
    def stream_chat(
        self,
        tokenizer,
        query,
        history=None,
        past_key_values=None,
        max_length=8192,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        logits_processor=None,
        return_past_key_values=False,
        **kwargs,
    ):
        """Yield (response so far, history) as tokens arrive (and the cache, with `return_past_key_values`).

        With `past_key_values` from the previous turn only the new round is encoded and positions
        continue after the cached tokens. Partial outputs ending in an incomplete character are skipped.
        """
        history = check_chat_arguments(query, history)
        if past_key_values is None:
            inputs = tokenizer([tokenizer.build_prompt(query, history)], return_tensors="pt").to(self.device)
            past_length = 0
        else:
            round_prompt = f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答："
            inputs = tokenizer([round_prompt], add_special_tokens=False, return_tensors="pt").to(self.device)
            past_length = past_key_values.get_seq_length()
        prompt_length = inputs["input_ids"].shape[1]
        self._check_prompt(past_length + prompt_length, max_length)
        attention_mask = inputs["attention_mask"]
        if past_length:
            attention_mask = torch.cat((attention_mask.new_ones(1, past_length), attention_mask), dim=1)
        for step in self.stream_generate(
            inputs["input_ids"],
            attention_mask=attention_mask,
            position_ids=inputs["position_ids"] + past_length,
            past_key_values=past_key_values,
            max_length=max_length,
            do_sample=do_sample,
            top_p=top_p,
            temperature=temperature,
            logits_processor=logits_processor,
            return_past_key_values=return_past_key_values,
            **kwargs,
        ):
            output_ids, cache = step if return_past_key_values else (step, None)
            response = tokenizer.decode(output_ids[0, prompt_length:].tolist())
            if response and response[-1] == "\ufffd":
                continue
            response = process_response(response)
            new_history = history + [(query, response)]
            yield (response, new_history, cache) if return_past_key_values else (response, new_history)

    @torch.inference_mode()
    def stream_generate(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        max_length=None,
        max_new_tokens=None,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        top_k=None,
        logits_processor=None,
        eos_token_id=None,
        return_past_key_values=False,
    ):
        """Yield the input ids followed by the tokens generated so far, one step at a time.

        `max_length` bounds the whole context (cached tokens included); `max_new_tokens` the new tokens.
        The cache (with `return_past_key_values`) always holds every yielded token except a final eos,
        so that it can continue the conversation.
        """
        if max_length is None and max_new_tokens is None:
            max_length = self.generation_config.max_length
        eos_token_id = self.generation_config.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = torch.tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []), device=input_ids.device
        )
        pad_token_id = self.generation_config.pad_token_id or 0
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        if do_sample:
            if temperature is not None and temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_k:
                processors.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))

        cache = past_key_values if past_key_values is not None else DynamicCache()
        past_length = cache.get_seq_length()
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = input_ids.new_ones(batch, past_length + input_ids.shape[1])
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        limit = max_length - past_length if max_new_tokens is None else input_ids.shape[1] + max_new_tokens
        if max_new_tokens is not None and max_length is not None:
            limit = min(limit, max_length - past_length)

        sequence = input_ids
        step_ids = input_ids
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        while sequence.shape[1] < limit:
            outputs = self(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            scores = processors(sequence, outputs.logits[:, -1, :].float())
            if do_sample:
                next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = scores.argmax(dim=-1)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
            sequence = torch.cat((sequence, next_tokens[:, None]), dim=-1)
            unfinished &= ~torch.isin(next_tokens, eos_ids)
            step_ids = next_tokens[:, None]
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(batch, 1)), dim=-1)
            position_ids = position_ids[:, -1:] + 1
            finished = not bool(unfinished.any()) or sequence.shape[1] >= limit
            if finished and return_past_key_values and bool(unfinished.any()):
                # Stopped by length: feed the last token so the cache covers everything yielded.
                self(
                    input_ids=step_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            yield (sequence, cache) if return_past_key_values else sequence
            if finished:
                break


class ChatGLMForSequenceClassification(ChatGLMPreTrainedModel):
    """Classification or regression on the hidden state of each sequence's last real token."""

    def __init__(self, config, empty_init=True, device=None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.classifier_head = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.dropout = nn.Dropout(config.classifier_dropout) if config.classifier_dropout is not None else None
        self.post_init()

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if attention_mask is None:
            last_index = torch.full((hidden_states.shape[0],), hidden_states.shape[1] - 1, device=hidden_states.device)
        else:
            # Works for left padding (the tokenizer's) and right padding alike.
            real = attention_mask[:, -hidden_states.shape[1] :].to(hidden_states.device).bool()
            columns = torch.arange(real.shape[1], device=hidden_states.device)
            last_index = torch.where(real, columns, -1).max(dim=-1).values
        pooled = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last_index]
        if self.dropout is not None:
            pooled = self.dropout(pooled)
        logits = self.classifier_head(pooled.to(self.classifier_head.weight.dtype))

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            problem_type = self.config.problem_type
            if problem_type is None:
                if self.num_labels == 1:
                    problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem_type = "single_label_classification"
                else:
                    problem_type = "multi_label_classification"
                self.config.problem_type = problem_type
            if problem_type == "regression":
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float().view(-1)) if self.num_labels == 1 else (
                    F.mse_loss(logits.float(), labels.float())
                )
            elif problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())

        cache = getattr(outputs, CACHE_FIELD)
        if not return_dict:
            output = tuple(v for v in (logits, cache, outputs.hidden_states, outputs.attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: cache},
        )
