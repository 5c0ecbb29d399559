"""An independent ChatGLM2 forward pass written from the spec (§3), in plain float32 PyTorch.

It reads a state dict with the released names and shares no code with the package, so the two
agreeing means the package computes the function the released weights were trained for.
"""

import math

import torch


def rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x, positions, base=10000.0, position_divisor=1.0):
    """x: [seq, heads, head_dim]; rotate adjacent pairs of the first half of head_dim.

    Pair i turns by `(position / position_divisor) * base ** (-2i / rotary_dim)` (glm-family facts:
    chatglm2-6b-32k divides positions by rope_ratio, chatglm3-6b-32k/128k multiply the base by it).
    """
    head_dim = x.shape[-1]
    rotary_dim = head_dim // 2
    out = x.clone()
    for i in range(rotary_dim // 2):
        theta = base ** (-2 * i / rotary_dim)
        angle = (positions.double()[:, None] / position_divisor) * theta
        cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
        even, odd = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = even * cos - odd * sin
        out[..., 2 * i + 1] = odd * cos + even * sin
    return out


def reference_logits(
    state_dict, config, input_ids, positions=None, padding_mask=None, rotary_base=10000.0, position_divisor=1.0
):
    """Logits [batch, seq, vocab] for `input_ids` [batch, seq], one sequence at a time."""
    sd = {name.removeprefix("transformer."): tensor.float() for name, tensor in state_dict.items()}
    heads, head_dim = config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    eps = config["layernorm_epsilon"]
    batch, seq = input_ids.shape
    if padding_mask is None:
        padding_mask = torch.ones(batch, seq, dtype=torch.long)
    if positions is None:
        positions = (padding_mask.cumsum(-1) - 1).clamp(min=0)
    results = []
    for row in range(batch):
        x = sd["embedding.word_embeddings.weight"][input_ids[row]]
        real = padding_mask[row].bool()
        for layer in range(config["num_layers"]):
            p = f"encoder.layers.{layer}."
            h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
            qkv = h @ sd[p + "self_attention.query_key_value.weight"].T
            if p + "self_attention.query_key_value.bias" in sd:
                qkv = qkv + sd[p + "self_attention.query_key_value.bias"]
            if config["multi_query_attention"]:
                q = qkv[:, : heads * head_dim].reshape(seq, heads, head_dim)
                k = qkv[:, heads * head_dim : (heads + groups) * head_dim].reshape(seq, groups, head_dim)
                v = qkv[:, (heads + groups) * head_dim :].reshape(seq, groups, head_dim)
            else:
                per_head = qkv.reshape(seq, heads, 3 * head_dim)
                q, k, v = per_head[..., :head_dim], per_head[..., head_dim : 2 * head_dim], per_head[..., 2 * head_dim :]
            q = rotate(q, positions[row], rotary_base, position_divisor)
            k = rotate(k, positions[row], rotary_base, position_divisor)
            context = torch.empty(seq, heads, head_dim)
            for head in range(heads):
                group = head // (heads // groups)
                scores = (q[:, head] @ k[:, group].T) / math.sqrt(head_dim)
                allowed = torch.ones(seq, seq).tril().bool() & real[None, :]
                allowed |= torch.eye(seq, dtype=torch.bool)
                scores = scores.masked_fill(~allowed, float("-inf"))
                context[:, head] = torch.softmax(scores, -1) @ v[:, group]
            x = x + context.reshape(seq, heads * head_dim) @ sd[p + "self_attention.dense.weight"].T
            h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
            up = h @ sd[p + "mlp.dense_h_to_4h.weight"].T
            a, b = up[:, : config["ffn_hidden_size"]], up[:, config["ffn_hidden_size"] :]
            x = x + (torch.nn.functional.silu(a) * b) @ sd[p + "mlp.dense_4h_to_h.weight"].T
        x = rms_norm(x, sd["encoder.final_layernorm.weight"], eps)
        results.append(x @ sd["output_layer.weight"].T)
    return torch.stack(results)
