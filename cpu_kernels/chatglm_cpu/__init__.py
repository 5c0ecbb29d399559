"""Integer-dot CPU kernels for ChatGLM's released int4 / int8 weights (optional accelerator).

`linear(x, weight, scale, bias, bits)` multiplies float activations by a weight stored as the
released checkpoints store it (int8 [N, K] for 8 bits; int8 [N, K/2] for 4 bits, two signed
nibbles per byte, the even input high) with one scale per output row. Activations are quantized
to int8 per group of inputs and multiplied with integer dot products, reading each weight byte
once where it lies: no conversion, no second copy. The model files use it when installed and asked
for (`model.quantize(4, cpu_kernel="chatglm_cpu")`); they never need it.
"""

import ctypes
import glob
import os

import torch

from . import _kernels

__all__ = ["available", "isa", "isas", "linear", "GROUP_SIZES"]

# Inputs per activation scale, the largest that divides K. Four 32-input blocks is the most whose
# int4 products still add up exactly in 16-bit lanes.
GROUP_SIZES = (128, 64, 32)

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _openmp_parallel_entry():
    """The address of GOMP_parallel in the OpenMP runtime torch computes with, or 0 where there is none.

    torch's own copy first (its wheels ship one under torch/lib, already loaded: opening it again
    returns the same library), else whatever the process has loaded. Threads of that runtime are the
    ones torch just used, still awake: a second pool of threads would compete with them for the cores.
    """
    torch_libraries = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates = [*sorted(glob.glob(os.path.join(torch_libraries, "lib*omp*.so*"))), None]
    for candidate in candidates:
        try:
            entry = ctypes.CDLL(candidate).GOMP_parallel
        except (OSError, AttributeError):
            continue
        return ctypes.cast(entry, ctypes.c_void_p).value or 0
    return 0


_kernels.set_parallel_runtime(_openmp_parallel_entry())


# Read once: `linear` checks it at every call. Codes as the C module takes them.
_ISAS = _kernels.isas()
_ISA_CODES = {"avx2": 0, "avx512_vnni": 1}


def isas():
    """The instruction sets whose kernels this CPU runs, best first: ("avx512_vnni", "avx2"), ("avx2",) or ()."""
    return _ISAS


def isa():
    """The instruction set `linear` uses by default on this CPU ("avx512_vnni" or "avx2"), or "" where it cannot run."""
    return _ISAS[0] if _ISAS else ""


def available():
    return bool(_ISAS)


def _check_vector(name, tensor, length):
    if tensor.dtype not in _DTYPE_CODES or tensor.shape != (length,) or not tensor.is_cpu:
        raise ValueError(
            f"chatglm_cpu.linear: {name} must be a CPU float32/float16/bfloat16 tensor of shape ({length},), "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)} on {tensor.device}"
        )


def linear(x, weight, scale, bias=None, bits=4, threads=None, isa=None):
    """x [M, K] (float32/float16/bfloat16) times the quantized weight, scaled per row, + bias -> [M, N] in x's dtype.

    `threads` defaults to torch's intra-op thread count; `isa` (one of `isas()`) to the best this CPU
    runs. Every instruction set gives the same result bit for bit.
    """
    if bits not in (4, 8):
        raise ValueError(f"chatglm_cpu.linear: bits must be 4 or 8, got {bits!r}")
    if not available():
        raise RuntimeError("chatglm_cpu.linear: this CPU has no AVX2/FMA/F16C (see chatglm_cpu.isas())")
    if isa is None:
        isa = _ISAS[0]
    elif isa not in _ISAS:
        raise ValueError(f"chatglm_cpu.linear: isa must be one this CPU runs, {', '.join(_ISAS)}; got {isa!r}")
    if x.dim() != 2 or x.dtype not in _DTYPE_CODES or not x.is_cpu:
        raise ValueError(
            f"chatglm_cpu.linear: x must be a 2-D CPU float32/float16/bfloat16 tensor, "
            f"got {x.dtype} of shape {tuple(x.shape)} on {x.device}"
        )
    rows, in_features = x.shape
    out_features = weight.shape[0] if weight.dim() == 2 else -1
    if (
        weight.dtype != torch.int8
        or weight.dim() != 2
        or weight.shape[1] * 8 != in_features * bits
        or not weight.is_cpu
        or not weight.is_contiguous()
    ):
        raise ValueError(
            f"chatglm_cpu.linear: weight must be a contiguous CPU int8 tensor of shape [N, {in_features * bits // 8}] "
            f"for {bits}-bit weights and {in_features} inputs, got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    group = next((size for size in GROUP_SIZES if in_features % size == 0), None)
    if group is None:
        raise ValueError(f"chatglm_cpu.linear: the input width must be a multiple of 32, got {in_features}")
    _check_vector("scale", scale, out_features)
    if bias is not None:
        _check_vector("bias", bias, out_features)
    x = x.contiguous()
    scale = scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(rows, out_features, dtype=x.dtype)
    _kernels.linear(
        bits,
        x.data_ptr(), _DTYPE_CODES[x.dtype], rows, in_features,
        weight.data_ptr(), out_features,
        scale.data_ptr(), _DTYPE_CODES[scale.dtype],
        bias.data_ptr() if bias is not None else 0, _DTYPE_CODES[bias.dtype] if bias is not None else 0,
        out.data_ptr(), _DTYPE_CODES[out.dtype],
        group,
        threads if threads is not None else torch.get_num_threads(),
        _ISA_CODES[isa],
    )
    return out
