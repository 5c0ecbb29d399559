"""Integer-dot CPU kernels for ChatGLM's released int4 / int8 weights (optional accelerator).

`linear(x, weight, scale, bias, bits)` multiplies float activations by a weight stored as the
released checkpoints store it (int8 [N, K] for 8 bits; int8 [N, K/2] for 4 bits, two signed
nibbles per byte, the even input high) with one scale per output row. Activations are quantized
to int8 per group of inputs and multiplied with integer dot products, reading each weight byte
once where it lies: no conversion, no second copy. `FloatWeight` does the same for float16/bfloat16
weights (a decode step at the memory's bandwidth; prompts where torch multiplies those dtypes in a
loop, as on AVX2 CPUs), and `attend` computes the
attention of one query per sequence over a key/value cache. The model files use them where installed
(`cpu_kernel="auto"`, the default, or "chatglm_cpu"); they never need them.
"""

import ctypes
import glob
import os

import torch

from . import _kernels

__all__ = [
    "attend", "available", "isa", "isas", "linear", "QuantizedWeight", "FloatWeight",
    "GROUP_SIZES", "FLOAT_PASS_ROWS", "CHUNK_ROWS", "UNPACK_ONCE_FROM_ROWS", "VNNI_BATCH_ROWS",
]

# The package's one version: pyproject.toml reads it from here.
# 0.2: `QuantizedWeight(...)(x, rms_norm=(weight, eps))` applies an RMSNorm to x on the way in.
# 0.3: `FloatWeight`, float16/bfloat16 weights times a few activation rows; `attend`, one query's attention;
# `QuantizedWeight(...)(x, swiglu=True)`.
# 0.4: `FloatWeight` takes any number of rows, FLOAT_PASS_ROWS per pass over the weight.
# 0.4.1: batches on VNNI in blocks of activation rows (the same results, bit for bit).
# 0.4.2: the constants below come from the C module (the same results, bit for bit).
# 0.4.3: VNNI batches and float weights on 512-bit registers, one activation row streams int8 rows one at a time on
# VNNI (the same bits); `FloatWeight(..., isa=)`; `attend` adds from each sequence's first attended key.
# 0.4.4: on VNNI one activation row streams int4 rows 128 inputs per register, batches take weight rows in pairs,
# outputs are stored 4 at a time, float weights serve 4 activation rows per conversion (the same bits).
__version__ = "0.4.4"

# Defined in _kernels.c only, read from the built module. GROUP_SIZES: inputs per activation scale, largest first (a
# weight takes the largest that divides its width). FLOAT_PASS_ROWS: activation rows per pass of a `FloatWeight` call
# over its weight. CHUNK_ROWS, UNPACK_ONCE_FROM_ROWS, VNNI_BATCH_ROWS: where the kernels change path (results never do).
GROUP_SIZES = _kernels.GROUP_SIZES
FLOAT_PASS_ROWS = _kernels.FLOAT_PASS_ROWS
CHUNK_ROWS = _kernels.CHUNK_ROWS
UNPACK_ONCE_FROM_ROWS = _kernels.UNPACK_ONCE_FROM_ROWS
VNNI_BATCH_ROWS = _kernels.VNNI_BATCH_ROWS

_DTYPE_CODES = {torch.float32: _kernels.DTYPE_FLOAT32, torch.float16: _kernels.DTYPE_FLOAT16, torch.bfloat16: _kernels.DTYPE_BFLOAT16}


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
_ISA_CODES = {name: code for code, name in enumerate(_kernels.ISA_NAMES)}


def _chosen_isa(caller, isa):
    """`isa` (None: this CPU's best), checked to be one this CPU runs."""
    if isa is None:
        return _ISAS[0]
    if isa not in _ISAS:
        raise ValueError(f"{caller}: isa must be one this CPU runs, {', '.join(_ISAS)}; got {isa!r}")
    return isa


def isas():
    """The instruction sets whose kernels this CPU runs, best first: ("avx512_vnni", "avx2"), ("avx2",) or ()."""
    return _ISAS


def isa():
    """The instruction set `linear` uses by default on this CPU ("avx512_vnni" or "avx2"), or "" where it cannot run."""
    return _ISAS[0] if _ISAS else ""


def available():
    return bool(_ISAS)


def _check_plain(caller, **tensors):
    """Refuse tensor subclasses (wrappers such as torchao's quantized tensors, DTensor, functorch's batched
    tensors): their data pointer is not their values' memory, and the kernels read memory."""
    for name, tensor in tensors.items():
        if tensor is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise ValueError(f"{caller}: {name} must be a plain torch.Tensor, got a {type(tensor).__name__}")


def _check_vector(name, tensor, length, caller="chatglm_cpu.linear"):
    if tensor.dtype not in _DTYPE_CODES or tensor.shape != (length,) or not tensor.is_cpu:
        raise ValueError(
            f"{caller}: {name} must be a CPU float32/float16/bfloat16 tensor of shape ({length},), "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)} on {tensor.device}"
        )


class QuantizedWeight:
    """One layer's quantized weight, scale and bias, checked once, for many `linear` calls.

    A decode step multiplies 112 weights by one activation row each; checking every weight tensor
    at every call cost more than the Python of the call itself (the weight stream before it has
    evicted the interpreter's working set from the caches). Calling this checks only `x`. It holds
    its own aliases of the tensors (`detach()`), so they stay alive and keep this dtype and shape
    whatever happens to the caller's tensor objects; values written into them in place are seen.
    """

    __slots__ = ("bits", "isa", "in_features", "out_features", "group", "_tensors", "_isa_code", "_weight_arguments")

    def __init__(self, weight, scale, bias=None, bits=4, isa=None):
        if bits not in (4, 8):
            raise ValueError(f"chatglm_cpu.linear: bits must be 4 or 8, got {bits!r}")
        _check_plain("chatglm_cpu.linear", weight=weight, scale=scale, bias=bias)
        if not available():
            raise RuntimeError("chatglm_cpu.linear: this CPU has no AVX2/FMA/F16C (see chatglm_cpu.isas())")
        isa = _chosen_isa("chatglm_cpu.linear", isa)
        if weight.dtype != torch.int8 or weight.dim() != 2 or not weight.is_cpu or not weight.is_contiguous():
            raise ValueError(
                f"chatglm_cpu.linear: weight must be a contiguous CPU int8 tensor [N, K * {bits} / 8], "
                f"got {weight.dtype} of shape {tuple(weight.shape)}"
            )
        out_features, in_features = weight.shape[0], weight.shape[1] * 8 // bits
        group = next((size for size in GROUP_SIZES if in_features % size == 0), None)
        if group is None:
            raise ValueError(f"chatglm_cpu.linear: the input width must be a multiple of {GROUP_SIZES[-1]}, got {in_features}")
        _check_vector("scale", scale, out_features)
        if bias is not None:
            _check_vector("bias", bias, out_features)
        self.bits, self.isa, self.in_features, self.out_features, self.group = bits, isa, in_features, out_features, group
        self._tensors = (weight.detach(), scale.detach().contiguous(), bias.detach().contiguous() if bias is not None else None)
        weight, scale, bias = self._tensors
        self._isa_code = _ISA_CODES[isa]
        # The C function's weight-side arguments, in its order (see `__call__`): addresses of the aliases above.
        self._weight_arguments = (
            weight.data_ptr(), out_features,
            scale.data_ptr(), _DTYPE_CODES[scale.dtype],
            bias.data_ptr() if bias is not None else 0, _DTYPE_CODES[bias.dtype] if bias is not None else 0,
        )

    def __reduce__(self):
        # Copies and pickles check the copied tensors again: the addresses above belong to this process's tensors.
        return QuantizedWeight, (*self._tensors, self.bits, self.isa)

    def __call__(self, x, threads=None, rms_norm=None, swiglu=False):
        """x [M, K] (float32/float16/bfloat16, CPU) -> [M, N] in x's dtype; `threads` as in `linear`.

        `rms_norm=(weight [K], eps)` multiplies the RMSNorm of each row of x, `x / sqrt(mean(x^2) + eps) *
        weight` computed in float32 and not rounded to x's dtype, instead of x: the norm before a
        projection costs a decode step a dozen torch operators per layer, and this no time.
        `swiglu=True` takes x [M, 2K], rows [gate | up], and multiplies `silu(gate) * up`, in float32 too.
        """
        _check_plain("chatglm_cpu.linear", x=x, rms_norm_weight=rms_norm[0] if rms_norm is not None else None)
        dtype_code = _DTYPE_CODES.get(x.dtype)
        width = 2 * self.in_features if swiglu else self.in_features
        if x.dim() != 2 or dtype_code is None or not x.is_cpu or x.shape[1] != width:
            raise ValueError(
                f"chatglm_cpu.linear: x must be a 2-D CPU float32/float16/bfloat16 tensor of width "
                f"{width}{' ([gate | up] for swiglu)' if swiglu else ''}, got {x.dtype} of shape {tuple(x.shape)} on {x.device}"
            )
        if swiglu and rms_norm is not None:
            raise ValueError("chatglm_cpu.linear: rms_norm and swiglu cannot be combined")
        norm_weight, eps = rms_norm if rms_norm is not None else (None, 0.0)
        if norm_weight is not None:
            _check_vector("the RMSNorm weight", norm_weight, self.in_features)
            norm_weight = norm_weight.contiguous()
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        _kernels.linear(
            self.bits, x.data_ptr(), dtype_code, x.shape[0], self.in_features,
            *self._weight_arguments,
            out.data_ptr(), dtype_code, self.group,
            threads if threads is not None else torch.get_num_threads(),
            self._isa_code,
            norm_weight.data_ptr() if norm_weight is not None else 0,
            _DTYPE_CODES[norm_weight.dtype] if norm_weight is not None else 0,
            float(eps),
            int(bool(swiglu)),
        )
        return out


class FloatWeight:
    """A float16 or bfloat16 weight [N, K] (K a multiple of 32) and optional bias, checked once:
    `FloatWeight(weight, bias)(x)` is `x @ weight.T + bias`.

    Products are exact in float32 and added in float32 (torch's CPU kernels too, in another order), then
    rounded to x's dtype. Each weight row is read once for all activation rows, in one sequential stream
    per thread, so a decode step's vocabulary projection runs at the memory's bandwidth; more rows than
    FLOAT_PASS_ROWS take a pass each FLOAT_PASS_ROWS. Against torch: bench/README.md, "Tuning constants".
    """

    __slots__ = ("isa", "in_features", "out_features", "_tensors", "_isa_code", "_weight_arguments")

    def __init__(self, weight, bias=None, isa=None):
        if not available():
            raise RuntimeError("chatglm_cpu.FloatWeight: this CPU has no AVX2/FMA/F16C (see chatglm_cpu.isas())")
        self.isa = _chosen_isa("chatglm_cpu.FloatWeight", isa)
        self._isa_code = _ISA_CODES[self.isa]
        _check_plain("chatglm_cpu.FloatWeight", weight=weight, bias=bias)
        if weight.dtype not in (torch.float16, torch.bfloat16) or weight.dim() != 2 or not weight.is_cpu or not weight.is_contiguous():
            raise ValueError(
                f"chatglm_cpu.FloatWeight: weight must be a contiguous 2-D CPU float16/bfloat16 tensor, "
                f"got {weight.dtype} of shape {tuple(weight.shape)} on {weight.device}"
            )
        self.out_features, self.in_features = weight.shape
        if self.in_features % _kernels.FLOAT_WIDTH_MULTIPLE:
            raise ValueError(
                f"chatglm_cpu.FloatWeight: the input width must be a multiple of {_kernels.FLOAT_WIDTH_MULTIPLE}, got {self.in_features}"
            )
        if bias is not None:
            _check_vector("bias", bias, self.out_features, "chatglm_cpu.FloatWeight")
        self._tensors = (weight.detach(), bias.detach().contiguous() if bias is not None else None)
        weight, bias = self._tensors
        self._weight_arguments = (
            weight.data_ptr(), _DTYPE_CODES[weight.dtype], self.out_features,
            bias.data_ptr() if bias is not None else 0, _DTYPE_CODES[bias.dtype] if bias is not None else 0,
        )

    def __reduce__(self):
        return FloatWeight, (*self._tensors, self.isa)

    def __call__(self, x, threads=None):
        """x [M, K] (float32/float16/bfloat16, CPU) -> [M, N] in x's dtype."""
        _check_plain("chatglm_cpu.FloatWeight", x=x)
        dtype_code = _DTYPE_CODES.get(x.dtype)
        if x.dim() != 2 or dtype_code is None or not x.is_cpu or x.shape[1] != self.in_features:
            raise ValueError(
                f"chatglm_cpu.FloatWeight: x must be a 2-D CPU float32/float16/bfloat16 tensor of width "
                f"{self.in_features}, got {x.dtype} of shape {tuple(x.shape)} on {x.device}"
            )
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        _kernels.float_linear(
            x.data_ptr(), dtype_code, x.shape[0], self.in_features,
            *self._weight_arguments,
            out.data_ptr(), dtype_code,
            threads if threads is not None else torch.get_num_threads(),
            self._isa_code,
        )
        return out


def attend(query, key, value, mask, scaling, threads=None):
    """Attention of one query per sequence: softmax(scaling * q K^T) V, in float32, rounded to the query's dtype.

    query [B, H, D], key and value [B, G, T, D] (G key/value groups; query head h reads group h // (H / G)),
    mask None or boolean [B, T] (True: attend; a row with none attends to every key uniformly, as torch's
    softmax over equal scores does), D a multiple of 8. Each thread takes one (sequence, group) at a time,
    converts its keys and values to float32 once and attends with all the heads that read them: a decode
    step's attention without float copies of the cache or a dozen torch operators per layer.
    """
    _check_plain("chatglm_cpu.attend", query=query, key=key, value=value, mask=mask)
    floats = tuple(_DTYPE_CODES)
    if query.dim() != 3 or key.dim() != 4 or key.shape != value.shape or not (query.is_cpu and key.is_cpu and value.is_cpu):
        raise ValueError(
            f"chatglm_cpu.attend: query must be [B, H, D] and key, value [B, G, T, D] CPU tensors, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, heads, dim = query.shape
    groups, keys = key.shape[1], key.shape[2]
    if key.shape[0] != batch or key.shape[3] != dim or dim % _kernels.ATTEND_DIM_MULTIPLE or not groups or heads % groups:
        raise ValueError(
            f"chatglm_cpu.attend: key [B, G, T, D] must match query [B, H, D] with D a multiple of {_kernels.ATTEND_DIM_MULTIPLE} and H a multiple "
            f"of G, got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if query.dtype not in floats or key.dtype not in floats or value.dtype != key.dtype:
        raise ValueError(
            f"chatglm_cpu.attend: query, key and value must be float32/float16/bfloat16, key and value alike, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (batch, keys) or not mask.is_cpu):
        raise ValueError(f"chatglm_cpu.attend: mask must be a CPU bool tensor of shape {(batch, keys)}, got {mask.dtype} of shape {tuple(mask.shape)}")
    if keys == 0:
        return torch.zeros_like(query)  # torch's product of an empty softmax with no values
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    mask = mask.contiguous() if mask is not None else None
    out = torch.empty_like(query)
    _kernels.attend(
        query.data_ptr(), _DTYPE_CODES[query.dtype], key.data_ptr(), value.data_ptr(), _DTYPE_CODES[key.dtype],
        batch, heads, groups, keys, dim, mask.data_ptr() if mask is not None else 0, float(scaling),
        out.data_ptr(), threads if threads is not None else torch.get_num_threads(),
    )
    return out


def linear(x, weight, scale, bias=None, bits=4, threads=None, isa=None):
    """x [M, K] (float32/float16/bfloat16) times the quantized weight, scaled per row, + bias -> [M, N] in x's dtype.

    `threads` defaults to torch's intra-op thread count; `isa` (one of `isas()`) to the best this CPU
    runs. Every instruction set gives the same result bit for bit. For many calls with one weight,
    `QuantizedWeight(weight, scale, bias, bits)(x)` checks the weight once.
    """
    if bits in (4, 8) and x.dim() == 2 and weight.dim() == 2 and weight.shape[1] * 8 != x.shape[1] * bits:
        raise ValueError(
            f"chatglm_cpu.linear: weight must be a contiguous CPU int8 tensor of shape [N, {x.shape[1] * bits // 8}] "
            f"for {bits}-bit weights and {x.shape[1]} inputs, got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    return QuantizedWeight(weight, scale, bias, bits, isa)(x, threads)
