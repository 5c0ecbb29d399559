"""The ChatGLM2 network and its task heads.

Module and parameter names match the released ChatGLM2-6B checkpoints, so the published weights load
unchanged. Attention runs through transformers' attention interface (SDPA by default, `eager` on request)
and the KV cache is a transformers `Cache` holding only the key/value groups of multi-query attention.
Beside this file: `chat`/`stream_chat` (chat_chatglm), the checks of a checkpoint before it loads
(checkpoint_chatglm) and the transformers 4.57 / 5.x differences (compat_chatglm).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .chat_chatglm import ChatGLMChatMixin, InvalidScoreLogitsProcessor  # noqa: F401  (the processor's published home)
from .checkpoint_chatglm import check_checkpoint_quantization, config_to_load, projection_shapes
from .compat_chatglm import given_cache, static_cache_length
from .configuration_chatglm import CACHE_FIELD, ChatGLMConfig
from .quantization import (
    FloatLinear,
    QuantizedLinear,
    chatglm_cpu_attention,
    prefault_mapped_weights,
    quantize_model,
    quantize_output_layer,
    set_cpu_kernel,
)

logger = logging.get_logger(__name__)

INITIALIZER_STD = 0.02
PREFIX_DROPOUT = 0.1


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states):
        # x * rsqrt(mean(x^2) + eps) * weight in float32, rounded to the input dtype at the end. torch's
        # rms_norm does those same operations (on the CPU, bit for bit) as one call instead of seven.
        normed = F.rms_norm(hidden_states.float(), self.weight.shape, self.weight.float(), self.eps)
        return normed.to(hidden_states.dtype)


def runs_only_its_forward(module):
    """Whether calling `module` runs just its `forward`: no hooks on it or on every module, and no forward set
    on the instance (accelerate's offloading wraps it so)."""
    hooked = module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
    return not hooked and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def may_apply_norm_in_projection(norm, sublayer, projection, states):
    """Whether `sublayer` may get `states` before `norm`, for its first `projection` to apply the norm in
    its own call: a quantized projection on chatglm_cpu applies an RMSNorm while it quantizes its input,
    sparing a decode step the norm's operators (bench/README.md, "Figures behind the model's CPU paths").
    Only where nothing can tell: none of the three modules is hooked, subclassed or has its forward
    replaced; the projection decides the rest (kernel, gradients, dtypes)."""
    if states.device.type != "cpu" or type(norm) is not RMSNorm or type(projection) is not QuantizedLinear:
        return False
    return all(map(runs_only_its_forward, (norm, sublayer, projection)))


def normed_projection(norm, projection, states):
    """`projection(norm(states))`, in one call where the projection can apply the norm (see
    `may_apply_norm_in_projection`); `projection(states)` without a norm."""
    if norm is None:
        return projection(states)
    out = projection.forward_after_rms_norm(states, norm.weight, norm.eps)
    return out if out is not None else projection(norm(states))


def swiglu_projection(projection, gate_up):
    """`projection(silu(gate) * up)` for gate_up = [gate | up]: in one call where the projection can take the
    SwiGLU on its way in (a quantized projection on chatglm_cpu, with nothing to see its input: no hooks, no
    forward set on it), else with torch's operators."""
    if type(projection) is QuantizedLinear and gate_up.is_cpu and runs_only_its_forward(projection):
        out = projection.forward_after_swiglu(gate_up)
        if out is not None:
            return out
    gate, up = gate_up.chunk(2, dim=-1)
    return projection(F.silu(gate) * up)


def make_norm(config, device=None, dtype=None):
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=dtype)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=dtype)


ROTARY_BASE = 10000.0


def rotary_inverse_frequencies(rotary_dim, base=ROTARY_BASE, device=None):
    """theta_i = base ** (-2i / rotary_dim), i < rotary_dim / 2, computed in float32."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rotary_scaling(config):
    """(base, position divisor) of the rotary angles: `rope_ratio` scales one of them (see ChatGLMConfig)."""
    ratio = float(getattr(config, "rope_ratio", 1) or 1)
    applies_to = getattr(config, "rope_ratio_applies_to", None)
    if ratio == 1:
        return ROTARY_BASE, 1.0
    if applies_to == "positions":
        return ROTARY_BASE, ratio
    if applies_to == "base":
        return ROTARY_BASE * ratio, 1.0
    raise ValueError(
        f"config.rope_ratio_applies_to must be 'positions' or 'base' when rope_ratio is {ratio}, got {applies_to!r}"
    )


class RotaryEmbedding(nn.Module):
    """Angles for the ChatGLM2 rotary embedding, which rotates only the first half of each head.

    The angle of pair i at position p is `(p / position_divisor) * base ** (-2i / rotary_dim)`:
    `rope_ratio` raises the base (ChatGLM3-32K/128K) or divides the positions (ChatGLM2-32K).
    Positions, frequencies and angles are computed in float32 at every call, from these settings.

    `inv_freq` (the base-10000 frequencies) is a persistent buffer only because the released
    checkpoints store it; its values are never read. The release stores it in float16, whose
    rounding would misplace angles by up to 0.3 radian at position 2000 and 5 radians at 32K, and
    the ChatGLM3-32K/128K releases store the unscaled base there; their code recomputed it too.
    """

    def __init__(self, rotary_dim, base=ROTARY_BASE, position_divisor=1.0, device=None):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.position_divisor = float(position_divisor)
        self.register_buffer("inv_freq", rotary_inverse_frequencies(rotary_dim, device=device), persistent=True)

    def forward(self, position_ids, dtype):
        # Only the finished cos/sin tables are rounded to the model dtype (float16 positions would
        # already be wrong above 2048).
        theta = rotary_inverse_frequencies(self.rotary_dim, self.base, device=position_ids.device)
        positions = position_ids.float()
        if self.position_divisor != 1.0:
            positions = positions / self.position_divisor
        angles = positions[..., None] * theta
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_tables(cos, sin, head_dim):
    """Per-dim tables for `apply_rotary_pos_emb` from the angles' cos/sin [..., rotary_dim / 2]: (cos of each
    dim's pair, then 1 for the dims not rotated; -sin, sin for each pair, then 0), [..., head_dim]."""
    passed = head_dim - 2 * cos.shape[-1]
    cos_per_dim = torch.cat((cos.repeat_interleave(2, dim=-1), cos.new_ones(*cos.shape[:-1], passed)), dim=-1)
    sin_per_dim = torch.cat((torch.stack((-sin, sin), dim=-1).flatten(-2), sin.new_zeros(*sin.shape[:-1], passed)), dim=-1)
    return cos_per_dim, sin_per_dim


def apply_rotary_pos_emb(states, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head by the tables of `rotary_tables`:
    (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin) on the rotated dims, x unchanged on the rest.

    `states` is [batch, seq, heads, head_dim]; `cos`/`sin` are [batch, seq, 1, head_dim]. Each product is
    rounded to the states' dtype before the sum, as when pairs are taken apart (bit for bit alike), in four
    operators over whole heads instead of fourteen: a decode step calls this once per layer.
    """
    swapped = states.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return states * cos + swapped * sin


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


def single_query_attention_on_cpu(query, key, value, attention_mask, scaling):
    """A decode step's attention on the CPU: one query per sequence, as two grouped float32 matmuls.

    query [batch, heads, 1, dim], key/value [batch, groups, keys, dim], attention_mask None or boolean
    [batch, 1, 1, keys] (True = attend); returns the context [batch, 1, heads, dim] in the query's dtype.
    The heads sharing a key group are its rows of one matmul, so no key is repeated. Torch's CPU
    flash-attention kernel is slower for a single query, most of all in half precision (bench/README.md,
    "Figures behind the model's CPU paths"). Prompts keep SDPA, which copies a float16 prompt to float32
    (for the same reason) and keeps a bfloat16 one as it is.
    """
    batch, heads, _, dim = query.shape
    groups, keys = key.shape[1:3]
    # 3-D batched matmuls over (sequence, group): a 4-D matmul adds six operators around the same bmm,
    # and every operator costs a decode step 28 times.
    grouped = (query.float() * scaling).reshape(batch * groups, heads // groups, dim)
    scores = torch.bmm(grouped, key.float().reshape(batch * groups, keys, dim).transpose(1, 2))
    if attention_mask is not None:
        masked = scores.view(batch, groups, -1, keys).masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        scores = masked.view(batch * groups, -1, keys)
    context = torch.bmm(torch.softmax(scores, dim=-1), value.float().reshape(batch * groups, keys, dim))
    return context.view(batch, 1, heads, dim).to(query.dtype)


class SelfAttention(nn.Module):
    is_causal = True

    def __init__(self, config, layer_number, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.layer_idx = layer_number - 1
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.multi_query_attention = config.multi_query_attention
        self.query_key_layer_scaling = config.apply_query_key_layer_scaling
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # "chatglm_cpu" (`set_cpu_kernel`, as for the quantized layers): decode steps attend in its kernel.
        self.cpu_kernel = "torch"
        shapes = projection_shapes(config)
        qkv_size, hidden_size = shapes["self_attention.query_key_value"]
        self.query_key_value = FloatLinear(
            hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias, device=device, dtype=dtype
        )
        self.dense = FloatLinear(
            *reversed(shapes["self_attention.dense"]), bias=config.add_bias_linear, device=device, dtype=dtype
        )

    def split_heads(self, mixed):
        """Fused QKV output [batch, seq, qkv] -> (query and key heads [batch, seq, heads + kv_heads, head_dim],
        queries first; value [batch, seq, kv_heads, head_dim]).

        Queries and keys stay together so that one rotary call rotates both.
        """
        batch, seq, _ = mixed.shape
        if self.multi_query_attention:
            query_key_size = (self.num_heads + self.num_key_value_heads) * self.head_dim
            query_key, value = mixed.split([query_key_size, mixed.shape[-1] - query_key_size], dim=-1)
            query_key = query_key.view(batch, seq, self.num_heads + self.num_key_value_heads, self.head_dim)
            value = value.view(batch, seq, self.num_key_value_heads, self.head_dim)
        else:
            # Without multi-query attention the release groups the outputs per head: [q | k | v] per head.
            per_head = mixed.view(batch, seq, self.num_heads, 3, self.head_dim)
            query_key = per_head[:, :, :, :2].transpose(2, 3).reshape(batch, seq, 2 * self.num_heads, self.head_dim)
            value = per_head[:, :, :, 2]
        return query_key, value

    def forward(self, hidden_states, rotary, attention_mask, prefix=None, cache=None, output_attentions=False, norm=None):
        """`norm`: the norm still to apply to `hidden_states` (see `normed_projection`), or None."""
        query_key, value = self.split_heads(normed_projection(norm, self.query_key_value, hidden_states))
        cos, sin, cache_position = rotary
        query_key = apply_rotary_pos_emb(query_key, cos, sin)
        query, key = query_key.split([self.num_heads, self.num_key_value_heads], dim=2)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, {"cache_position": cache_position})
        if prefix is not None:
            key = torch.cat((prefix[0].to(key.dtype), key), dim=2)
            value = torch.cat((prefix[1].to(value.dtype), value), dim=2)

        implementation = self.config._attn_implementation
        if output_attentions or implementation in (None, "eager"):
            attention = eager_attention_forward
        else:
            attention = ALL_ATTENTION_FUNCTIONS[implementation]
        options = {"scaling": self.scaling, "dropout": self.attention_dropout if self.training else 0.0}
        if implementation == "sdpa" and query.shape[2] == 1 and query.device.type == "cpu" and not options["dropout"]:
            context, probs = self.single_query_attention(query, key, value, attention_mask), None
        elif implementation == "sdpa" and query.device.type == "cpu" and query.dtype == torch.float16:
            # Torch's CPU attention is over twice as slow in float16 as in float32 (no float16 arithmetic to run on):
            # a prompt attends in float32, as the decode steps do (bench/README.md, "Figures behind the model's CPU paths").
            context, probs = attention(self, query.float(), key.float(), value.float(), attention_mask, **options)
            context = context.to(query.dtype)
        else:
            context, probs = attention(self, query, key, value, attention_mask, **options)
        output = self.dense(context.reshape(*hidden_states.shape[:-1], -1))
        return output, probs

    def single_query_attention(self, query, key, value, attention_mask):
        """`single_query_attention_on_cpu`, in chatglm_cpu's kernel where `cpu_kernel` chose it: one call instead
        of a dozen operators and float copies of the cache."""
        if self.cpu_kernel == "chatglm_cpu":
            mask = attention_mask[:, 0, 0] if attention_mask is not None else None
            context = chatglm_cpu_attention(query[:, :, 0], key, value, mask, self.scaling)
            if context is not None:
                return context[:, None]
        return single_query_attention_on_cpu(query, key, value, attention_mask, self.scaling)


class MLP(nn.Module):
    """SwiGLU: `dense_h_to_4h` yields [a | b]; `silu(a) * b` goes into `dense_4h_to_h`."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        shapes = projection_shapes(config)
        self.dense_h_to_4h = FloatLinear(
            *reversed(shapes["mlp.dense_h_to_4h"]), bias=config.add_bias_linear, device=device, dtype=dtype
        )
        self.dense_4h_to_h = FloatLinear(
            *reversed(shapes["mlp.dense_4h_to_h"]), bias=config.add_bias_linear, device=device, dtype=dtype
        )

    def forward(self, hidden_states, norm=None):
        """`norm`: the norm still to apply to `hidden_states` (see `normed_projection`), or None."""
        return swiglu_projection(self.dense_4h_to_h, normed_projection(norm, self.dense_h_to_4h, hidden_states))


class GLMBlock(GradientCheckpointingLayer):
    """One transformer layer; transformers' base class does the gradient checkpointing. The P-Tuning v2
    prefix key and value are separate positional tensors: reentrant checkpointing (the 4.57 default)
    only tracks gradients of tensors passed that way, and the prefix is all that trains."""

    def __init__(self, config, layer_number, device=None, dtype=None):
        super().__init__()
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = make_norm(config, device=device, dtype=dtype)
        self.self_attention = SelfAttention(config, layer_number, device=device, dtype=dtype)
        self.post_attention_layernorm = make_norm(config, device=device, dtype=dtype)
        self.mlp = MLP(config, device=device, dtype=dtype)

    def forward(
        self, hidden_states, rotary, attention_mask, prefix_key=None, prefix_value=None, cache=None, output_attentions=False
    ):
        prefix = None if prefix_key is None else (prefix_key, prefix_value)
        attention = self.self_attention
        states, norm, residual = self.before_sublayer(self.input_layernorm, attention, attention.query_key_value, hidden_states)
        attention_output, probs = self.self_attention(
            states, rotary, attention_mask, prefix, cache=cache, output_attentions=output_attentions, norm=norm
        )
        hidden_states = residual + self.dropout(attention_output)

        states, norm, residual = self.before_sublayer(self.post_attention_layernorm, self.mlp, self.mlp.dense_h_to_4h, hidden_states)
        hidden_states = residual + self.dropout(self.mlp(states, norm=norm))
        return hidden_states, probs

    def before_sublayer(self, norm, sublayer, projection, hidden_states):
        """(the sublayer's input, the norm it still has to apply or None, the residual): the states and the norm
        where its first projection may apply it (`may_apply_norm_in_projection`), else the normed states."""
        if not self.apply_residual_connection_post_layernorm and may_apply_norm_in_projection(norm, sublayer, projection, hidden_states):
            return hidden_states, norm, hidden_states
        normed = norm(hidden_states)
        return normed, None, normed if self.apply_residual_connection_post_layernorm else hidden_states

    def dropout(self, states):
        # Not even called in inference: every operator call costs a decode step 28 times over.
        return F.dropout(states, p=self.hidden_dropout, training=True) if self.training and self.hidden_dropout else states


class GLMTransformer(nn.Module):
    def __init__(self, config, device=None, dtype=None):
        super().__init__()
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
            prefix = prefixes[index] if prefixes is not None else (None, None)
            hidden_states, probs = layer(
                hidden_states, rotary, attention_mask, *prefix, cache=cache, output_attentions=output_attentions
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


def attention_mask_for(attention_mask, batch, query_length, past_length, prefix_length, device, key_length=None):
    """Boolean mask [batch, 1, query, prefix + keys] (True = attend), or None for plain causal.

    `attention_mask` is either [batch, past + query] with 0 at (left) padding, or a 4D mask that
    transformers already built (boolean, or additive with 0 where attention is allowed), as it does
    for static caches. `key_length` is how many keys the layers see after the cache update: past +
    query, or a static cache's whole length, whose unwritten slots lie in the future and are masked
    by causality. The prefix is always visible. A padding query still attends to itself so that
    its row never becomes all-masked (which would produce NaN that travels through the values).
    """
    natural_length = past_length + query_length
    key_length = natural_length if key_length is None else key_length
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask[:, 0].to(device).expand(batch, query_length, -1)
    else:
        has_padding = attention_mask is not None and not bool(attention_mask.all())
        if not has_padding and prefix_length == 0 and key_length == natural_length and (query_length == 1 or past_length == 0):
            return None
        query_positions = torch.arange(past_length, natural_length, device=device)
        key_positions = torch.arange(key_length, device=device)
        mask = key_positions[None, :] <= query_positions[:, None]
        mask = mask.expand(batch, query_length, key_length)
        if has_padding:
            padding = attention_mask.to(device=device, dtype=torch.bool)
            padding = F.pad(padding, (0, key_length - natural_length))
            diagonal = key_positions[None, :] == query_positions[:, None]
            mask = (mask & padding[:, None, :]) | diagonal
    if prefix_length:
        mask = torch.cat((mask.new_ones(batch, query_length, prefix_length), mask), dim=-1)
    return mask[:, None]


def positions_from_mask(padding_mask):
    """0..n-1 over the real tokens of each row; left padding gets 0 (as the tokenizer returns)."""
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


def head_output(output_class, base_output, **fields):
    """A head's `output_class`: its `fields` and the cache, hidden states and attentions of the base model."""
    return output_class(
        hidden_states=base_output.hidden_states,
        attentions=base_output.attentions,
        **{CACHE_FIELD: getattr(base_output, CACHE_FIELD)},
        **fields,
    )


def as_requested(output, return_dict, config):
    """`output`, or with `return_dict=False` (given, else the config's) the tuple of its fields that are not
    None, in order."""
    return_dict = return_dict if return_dict is not None else config.return_dict
    return output if return_dict else output.to_tuple()


def classification_loss(logits, labels, config):
    """The loss of `config.problem_type`, which the first labels decide where unset, as transformers'
    ForSequenceClassificationLoss does; that one refuses the integer 0/1 targets this takes for multi-label."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.float().view(-1))
        return F.mse_loss(logits, labels.float())
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.float())


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True

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
            check_checkpoint_quantization(pretrained_model_name_or_path, config_to_load(pretrained_model_name_or_path, kwargs))
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # transformers 5.x re-creates loaded parameters as trainable; P-Tuning v2 needs the base frozen.
        if model.config.pre_seq_len is not None:
            model.base_model.freeze_all_but_prefix()
        # Weights loaded as stored stay memory-mapped: their pages are mapped now, on a thread, not by page
        # faults in the first forward's kernels.
        prefault_mapped_weights(model)
        return loaded

    def quantize(self, bits, empty_init=False, device=None, output_layer_bits=0, cpu_kernel=None):
        """Quantize the four projection matrices of every layer to `bits` (4 or 8) in place; returns the model.

        `bits=0` and a second call are no-ops. With `device`, each layer moves there before it is
        quantized, so `.quantize(4, device="cuda")` never holds the float model on the GPU.

        `output_layer_bits` (4 or 8; opt-in, not in the release) also quantizes `output_layer`, the
        vocabulary projection: at 8 bits it halves the 533 MB every 6B decode step reads there.
        Checkpoints saved with it record `output_layer_quantization_bit` and load only with this code.

        `cpu_kernel` chooses how quantized layers compute on the CPU (quantization.CPU_KERNELS): "auto"
        (the default) runs "chatglm_cpu" (int8 activations, faster) where that package is installed and
        "torch" (exact weight-only) elsewhere; "onnxruntime" is opt-in. Given, it is saved in the config
        as `quantization_cpu_kernel`.
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
        set_cpu_kernel(self, self.config.quantization_cpu_kernel)
        return self


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding, the GLM blocks and the final norm; also holds `output_layer`, where the release keeps it."""

    def __init__(self, config, empty_init=True, device=None):
        # `empty_init` and `device` are the published constructor's arguments, accepted so that scripts
        # passing them keep working; transformers itself decides how weights are materialised.
        super().__init__(config)
        self.embedding = Embedding(config, device=device)
        base, position_divisor = rotary_scaling(config)
        self.rotary_pos_emb = RotaryEmbedding(
            config.kv_channels // 2, base=base, position_divisor=position_divisor, device=device
        )
        self.encoder = GLMTransformer(config, device=device)
        self.output_layer = FloatLinear(config.hidden_size, config.padded_vocab_size, bias=False, device=device)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.freeze_all_but_prefix()
        if config.quantization_bit:
            quantize_model(self, config.quantization_bit, empty_init=True)
        if config.output_layer_quantization_bit:
            quantize_output_layer(self, config.output_layer_quantization_bit, empty_init=True)
        set_cpu_kernel(self, config.quantization_cpu_kernel)
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
        cache=None,
        cache_position=None,
        **kwargs,
    ):
        cache = given_cache(cache, past_key_values)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        checkpointing = any(layer.gradient_checkpointing for layer in self.encoder.layers)
        if checkpointing and self.training and use_cache:
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
        if cache_position is not None:
            past_length = int(cache_position[0])
        else:
            past_length = cache.get_seq_length() if cache is not None else 0
            cache_position = torch.arange(past_length, past_length + query_length, device=device)
        key_length = static_cache_length(cache)

        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] != past_length + query_length:
            raise ValueError(
                f"`attention_mask` covers {attention_mask.shape[-1]} tokens but the cache holds {past_length} "
                f"and the input {query_length}; it must cover both ({past_length + query_length})"
            )
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = positions_from_mask(attention_mask)[:, -query_length:]
            else:
                position_ids = torch.arange(past_length, past_length + query_length, device=device).expand(batch, -1)

        prefixes = None
        prefix_length = 0
        if self.pre_seq_len is not None:
            prefixes = self.prefix_key_values(batch, device, inputs_embeds.dtype)
            prefix_length = self.pre_seq_len
        mask = attention_mask_for(attention_mask, batch, query_length, past_length, prefix_length, device, key_length)
        # The per-dim tables and their head axis are made here, once, rather than in every layer.
        cos, sin = rotary_tables(*self.rotary_pos_emb(position_ids.to(device), inputs_embeds.dtype), self.config.kv_channels)
        rotary = (cos[:, :, None], sin[:, :, None], cache_position)

        hidden_states, all_hidden_states, all_attentions = self.encoder(
            inputs_embeds,
            rotary,
            mask,
            cache=cache if use_cache else None,
            prefixes=prefixes,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return as_requested(output, return_dict, self.config)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin, ChatGLMChatMixin):
    def __init__(self, config, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.seq_length  # published attribute, read by user scripts
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
        cache=None,
        **kwargs,
    ):
        """Logits (and, with `labels`, the shifted cross-entropy; -100 is ignored).

        `logits_to_keep=n` computes logits for the last n positions only (`return_last_logit` is the
        published spelling of n=1): the vocabulary projection dominates prefill cost otherwise.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache=cache,
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
            loss = self.loss_function(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
        return as_requested(head_output(CausalLMOutputWithPast, outputs, loss=loss, logits=logits), return_dict, self.config)

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
        cache = given_cache(model_inputs.get("cache"), model_inputs.get("past_key_values"))
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
        cache=None,
        **kwargs,
    ):
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache=cache,
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

        loss = None if labels is None else classification_loss(logits.float(), labels.to(logits.device), self.config)
        output = head_output(SequenceClassifierOutputWithPast, outputs, loss=loss, logits=logits)
        return as_requested(output, return_dict, self.config)
