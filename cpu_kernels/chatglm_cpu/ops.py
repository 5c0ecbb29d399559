"""The kernels as torch operators: `torch.ops.chatglm_cpu.linear`, `.float_linear` and `.attend`.

Importing this module registers them (once per process: the installed package is one module). torch.compile
traces them as operators of its graph (their shapes come from the fake implementations), where a direct
call on raw addresses would end the graph. Eager code calls `QuantizedWeight` / `FloatWeight` directly: a
handle checked once costs less per call than an operator's dispatch.
"""

from typing import Optional

import torch

from . import FloatWeight, QuantizedWeight, attend as _attend

__all__ = ["linear", "float_linear", "attend"]


@torch.library.custom_op("chatglm_cpu::linear", mutates_args=(), device_types="cpu")
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    swiglu: bool = False,
) -> torch.Tensor:
    """`QuantizedWeight(weight, scale, bias, bits)(x)` over the rows of x [..., K], with its RMSNorm
    (`norm_weight`, `eps`) or SwiGLU (`swiglu`, x [..., 2K]) on the way in."""
    rows = x.reshape(-1, x.shape[-1])
    rms_norm = (norm_weight, eps) if norm_weight is not None else None
    out = QuantizedWeight(weight, scale, bias, bits)(rows, rms_norm=rms_norm, swiglu=swiglu)
    return out.view(*x.shape[:-1], out.shape[-1])


@linear.register_fake
def _(x, weight, scale, bias, bits, norm_weight=None, eps=0.0, swiglu=False):
    return x.new_empty(*x.shape[:-1], scale.shape[0])


@torch.library.custom_op("chatglm_cpu::float_linear", mutates_args=(), device_types="cpu")
def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`FloatWeight(weight, bias)(x)` over the rows of x [..., K]."""
    out = FloatWeight(weight, bias)(x.reshape(-1, x.shape[-1]))
    return out.view(*x.shape[:-1], out.shape[-1])


@float_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("chatglm_cpu::attend", mutates_args=(), device_types="cpu")
def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """`chatglm_cpu.attend`: one query per sequence over a key/value cache."""
    return _attend(query, key, value, mask, scaling)


@attend.register_fake
def _(query, key, value, mask, scaling):
    return torch.empty_like(query)
