"""Weight-only INT8 / INT4 quantization of the ChatGLM2 linear layers.

Checkpoint format (the released THUDM int4 format, spec section 6): per output row `r`,
`scale[r] = max|W[r]| / (2**(bits-1) - 1)` in the model dtype and `q = round(W / scale)` as int8.
8-bit weights are stored as that int8 [out, in] matrix; 4-bit weights as int8 [out, in/2] where byte
`j` holds `q[2j]` in the high nibble and `q[2j+1]` in the low nibble (signed two's complement).

A `QuantizedLinear` computes with one backend, the first of QUANTIZED_BACKENDS that fits it, chosen when its
weights, device or `cpu_kernel` change: chatglm_cpu or onnxruntime (int8 activations, opt-in by `cpu_kernel`;
chatglm_cpu is what "auto" picks where installed), PyTorch's int4/int8 weight-only CPU kernels, the Triton kernel
on CUDA, and the exact dequantize-and-multiply everywhere else (float32 and float64 activations take it too).
Quantized weights are frozen; gradients flow to the inputs, so LoRA / P-Tuning train on top.

Importing this module has no side effects: nothing is compiled and no global flag is set.
"""

import atexit
import ctypes
import functools
import logging
import mmap
import re
import sys
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # optional: CPU-only, macOS and Windows installs have no (working) triton
    _HAS_TRITON = False

logger = logging.getLogger(__name__)

# torch.compiler.is_compiling arrived in torch 2.3; before it, torch._dynamo's.
_is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: torch._dynamo.is_compiling())


def _autocast_on_cpu():
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4: no device argument
        return torch.is_autocast_cpu_enabled()


__all__ = [
    "CPU_KERNELS",
    "CpuInt4Layout",
    "DEFAULT_CPU_KERNEL",
    "FloatLinear",
    "MatMulNBits",
    "QUANTIZED_PROJECTIONS",
    "QUANTIZED_PROJECTION_WEIGHT",
    "QuantizedLinear",
    "check_stored_weight",
    "chatglm_cpu_attention",
    "dequantize_weight",
    "detect_cpu_int4_layout",
    "pack_int4",
    "populate",
    "prefault_mapped_weights",
    "quantize_model",
    "quantize_output_layer",
    "quantize_weight",
    "quantized_projection",
    "resolve_cpu_kernel",
    "set_cpu_kernel",
    "unpack_int4",
]

QUANTIZED_PROJECTIONS = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
# A checkpoint key naming the weight of one of them, with or without the model's prefix; group 1 is the projection.
QUANTIZED_PROJECTION_WEIGHT = re.compile(
    r"(?:^|\.)encoder\.layers\.\d+\.(" + "|".join(map(re.escape, QUANTIZED_PROJECTIONS)) + r")\.weight$"
)


def quantized_projection(key):
    """Which of `QUANTIZED_PROJECTIONS` the checkpoint key `key` is the weight of, or None."""
    match = QUANTIZED_PROJECTION_WEIGHT.search(key)
    return match.group(1) if match else None


def _check_bits(bits):
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")


def _packed_width(in_features, bits):
    return in_features // 2 if bits == 4 else in_features


def check_stored_weight(key, dtype, shape, out_features, in_features, bits, setting="quantization_bit"):
    """Raise ValueError unless a projection weight of `dtype`/`shape` fits a layer of `bits` (0 = float).

    The message names `key`, both shapes, and the value of the config `setting` the tensor was saved
    with where that can be told from its shape.
    """
    shape = tuple(shape)
    stored_bits = None
    if dtype.is_floating_point and shape == (out_features, in_features):
        stored_bits = 0
    elif dtype == torch.int8 and shape == (out_features, in_features):
        stored_bits = 8
    elif dtype == torch.int8 and shape == (out_features, _packed_width(in_features, 4)):
        stored_bits = 4
    if stored_bits == bits:
        return
    if bits:
        expected = f"an int8 weight of shape {(out_features, _packed_width(in_features, bits))}"
        needs = f"a {bits}-bit quantized layer needs {expected}"
    else:
        needs = f"a floating point layer needs a float weight of shape {(out_features, in_features)}"
    if stored_bits == 0:
        hint = f" It is not quantized: load it with {setting}=0, then quantize it to {bits} bits (model.quantize)."
    elif stored_bits is not None:
        hint = f" It has the shape of a {stored_bits}-bit checkpoint: set {setting}={stored_bits}."
    else:
        hint = ""
    raise ValueError(f"{key}: {needs}, got {dtype} of shape {shape}.{hint}")


# ---------------------------------------------------------------------------------------------
# The released format
# ---------------------------------------------------------------------------------------------


def pack_int4(q):
    """Pack int8 values in [-8, 7], shape [..., in], into int8 [..., in/2]: q[2j] high nibble, q[2j+1] low."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects an int8 tensor, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    checkable = q.numel() and q.device.type != "meta" and not _is_compiling()  # data-dependent
    if checkable:
        low, high = (value.item() for value in q.aminmax())
        if low < -8 or high > 7:
            raise ValueError(f"pack_int4: values must lie in [-8, 7], the signed 4-bit range; got [{low}, {high}]")
    # q << 4 stays within int8 for q in [-8, 7]; & 0xF keeps the low nibble's two's-complement bits.
    return (q[..., 0::2] << 4) | (q[..., 1::2] & 0xF)


def unpack_int4(packed):
    """Inverse of `pack_int4`: int8 [..., in/2] -> int8 [..., in] with values in [-8, 7]."""
    if packed.dtype != torch.int8:
        raise ValueError(f"unpack_int4 expects an int8 tensor, got {packed.dtype}")
    high = packed >> 4  # arithmetic shift sign-extends the high nibble
    low = (packed << 4) >> 4  # move the low nibble to the top, then sign-extend it back down
    return torch.stack((high, low), dim=-1).flatten(-2)


def quantize_weight(weight, bits):
    """Quantize a float [out, in] weight per output row -> (int8 weight in the released layout, scale [out]).

    The arithmetic runs in the weight's dtype, as the released code did, so a float16 checkpoint
    quantizes to the same bytes as the published int4 file. The scale keeps the weight's dtype.
    """
    _check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"quantize_weight expects a 2-D floating point weight, got {weight.dtype} of shape {tuple(weight.shape)}"
        )
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(f"int4 packs two inputs per byte: in_features must be even, weight shape {tuple(weight.shape)}")
    qmax = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=1) / qmax
    # An all-zero row keeps scale 0 (it dequantizes to 0) but must not divide 0 by 0.
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    # With a bfloat16 scale, rounding can push |W / scale| to qmax + 0.5; never let it wrap around.
    q = (weight / divisor[:, None]).round_().clamp_(-qmax, qmax).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def dequantize_weight(qweight, scale, bits):
    """Released layout (int8 [out, in] or [out, in/2]) and scale [out] -> float [out, in] in the scale's dtype."""
    _check_bits(bits)
    q = unpack_int4(qweight) if bits == 4 else qweight
    return q.to(scale.dtype).mul_(scale[:, None])


# ---------------------------------------------------------------------------------------------
# CPU kernels
# ---------------------------------------------------------------------------------------------

# PyTorch's weight-only CPU kernels (torch >= 2.6 has all of them); looking them up has no side effect.
_HAS_CPU_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_CPU_INT4_KERNEL = all(
    hasattr(torch.ops.aten, name) for name in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
)
# The CPU int4 matmul takes one scale per group of inputs; any of these sizes repeats the row scale.
_CPU_INT4_GROUP_SIZES = (256, 128, 64, 32)


class CpuInt4Layout(NamedTuple):
    """Torch's CPU int4 kernel layout (`_convert_weight_to_int4pack_for_cpu`) and the conversions
    between it and the released layout: the one place that knows both byte orders.

    The kernel dequantizes unsigned nibbles, (u - 8) * scale; released bytes hold signed ones q, and
    u = q + 8 is q's 4-bit two's complement with the top bit flipped (XOR 0x8 in each nibble). Rows
    go in blocks of `block` rows; inside a block, input column by column, each byte pairs two rows of
    the block, row j with j + block/2 (`split`) or 2j with 2j + 1. The rows left after the full
    blocks form one block paired 2j / 2j + 1. A block of rows thus takes the same bytes in both
    layouts, which lets `pack_into` convert a weight in its own memory. Which layout a torch build
    uses depends on the CPU's vector width: `detect_cpu_int4_layout` checks this description
    against torch's own packing, so only a layout reproduced exactly is ever used.
    """

    block: int
    split: bool

    # Rows converted per step by `pack_into`: a few MB of temporaries, whatever the layer's size.
    PACK_ROWS = 1024

    @staticmethod
    def fits(out_features, in_features):
        """Whether the kernel takes a weight of this shape (its row blocks and input groups)."""
        return out_features % 16 == 0 and in_features % 32 == 0

    @staticmethod
    def released_to_unsigned(released):
        """Released int4 int8 [out, in/2] -> unsigned nibbles uint8 [out, in]."""
        flipped = released.view(torch.uint8) ^ 0x88
        return torch.stack((flipped >> 4, flipped & 0xF), dim=-1).flatten(-2)

    @staticmethod
    def unsigned_to_released(unsigned):
        """Unsigned nibbles uint8 [out, in] -> released int4 int8 [out, in/2]."""
        released = (unsigned[:, 0::2] << 4) | unsigned[:, 1::2]  # keeps the input's memory order
        return released.contiguous().bitwise_xor_(0x88).view(torch.int8)

    def pack(self, released):
        """Released int4 int8 [out, in/2] -> this layout, flat uint8 [out * in / 2] (a new tensor)."""
        out_features, half = released.shape
        full_rows = out_features - out_features % self.block
        parts = []
        if full_rows:
            parts.append(self._pair_rows(released[:full_rows].view(-1, self.block, half), self.split))
        if out_features > full_rows:
            parts.append(self._pair_rows(released[full_rows:].view(1, -1, half), False))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def pack_into(self, released, destination):
        """Write released int4 int8 [out, in/2] into `destination`, flat uint8 [out * in / 2], in this layout.

        Block by block, so temporaries stay a few MB and `destination` may be `released`'s own
        memory: the conversion then allocates nothing lasting.
        """
        out_features, half = released.shape
        full_rows = out_features - out_features % self.block
        step = self.block * max(1, self.PACK_ROWS // self.block)
        edges = sorted({*range(0, full_rows, step), full_rows, out_features})
        for start, stop in zip(edges, edges[1:]):
            destination[start * half : stop * half] = self.pack(released[start:stop])

    def unpack(self, packed, out_features, in_features, dtype=torch.uint8, signed=False):
        """Inverse of `pack`: flat uint8 -> nibbles [out, in] as `dtype`, `u` or with `signed` `u - 8`.

        The result is the transposed view of a contiguous [in, out] tensor: the layout stores the
        inputs outermost, so this order is written in one pass per nibble (the dtype conversion
        included), and `F.linear` multiplies by it without another copy.
        """
        half = in_features // 2
        full_rows = out_features - out_features % self.block
        columns = torch.empty(in_features, out_features, dtype=dtype, device=packed.device)
        if full_rows:
            blocks = packed[: full_rows * half].view(-1, in_features, self.block // 2)
            self._unpair_rows_into(columns[:, :full_rows].view(in_features, -1, self.block), blocks, self.split, signed)
        if out_features > full_rows:
            tail = packed[full_rows * half :].view(1, in_features, -1)
            self._unpair_rows_into(columns[:, full_rows:].view(in_features, 1, -1), tail, False, signed)
        return columns.t()

    def to_released(self, packed, out_features, in_features):
        """Flat uint8 in this layout -> a new released int4 int8 [out, in/2]."""
        return self.unsigned_to_released(self.unpack(packed, out_features, in_features))

    @staticmethod
    def _pair_rows(released, split):
        """[blocks, B, in/2] released bytes -> the bytes of those blocks in this layout, [blocks, in, B/2] flattened.

        Works on whole bytes: of a released byte's two nibbles, input 2c is the high one and
        2c + 1 the low one; a layout byte holds one input of two rows, the row paired low in its
        low nibble. So input 2c takes (low_row >> 4) | (high_row & 0xF0) and input 2c + 1
        (low_row & 0xF) | (high_row << 4), after the XOR that makes the nibbles unsigned.
        """
        rows = released.view(torch.uint8) ^ 0x88
        half = rows.shape[1] // 2
        low, high = (rows[:, :half], rows[:, half:]) if split else (rows[:, 0::2], rows[:, 1::2])
        packed = torch.empty(rows.shape[0], rows.shape[2], 2, half, dtype=torch.uint8, device=rows.device)
        packed[:, :, 0] = ((low >> 4) | (high & 0xF0)).transpose(1, 2)
        packed[:, :, 1] = ((low & 0xF) | (high << 4)).transpose(1, 2)
        return packed.view(-1)

    @staticmethod
    def _unpair_rows_into(columns, packed, split, signed):
        """[blocks, K, B/2] bytes -> `columns` [K, blocks, B]: the B rows of each block, in order, per input."""
        if signed:
            # u - 8 is the signed reading of u XOR 8; shifts of int8 sign-extend it.
            flipped = (packed ^ 0x88).view(torch.int8)
            low, high = (flipped << 4) >> 4, flipped >> 4
        else:
            low, high = packed & 0xF, packed >> 4
        if split:
            half = columns.shape[-1] // 2
            low_rows, high_rows = columns[..., :half], columns[..., half:]
        else:
            pairs = columns.unflatten(-1, (-1, 2))
            low_rows, high_rows = pairs[..., 0], pairs[..., 1]
        low_rows.copy_(low.transpose(0, 1))
        high_rows.copy_(high.transpose(0, 1))


@functools.cache
def detect_cpu_int4_layout():
    """The `CpuInt4Layout` of this torch build and CPU, or None when torch packs otherwise (or has no kernel).

    64-row blocks on AVX512, 32 on AVX2 and plain builds. Only a layout reproduced exactly is
    used, so `state_dict()` can always give the released format back; otherwise 4-bit layers on
    this CPU take the dequantizing fallback.
    """
    if not _HAS_CPU_INT4_KERNEL:
        return None
    # 176 rows = whole blocks plus a remainder for every block size; random nibbles rule out coincidences.
    probe = torch.randint(-128, 128, (176, 2), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    unsigned = CpuInt4Layout.released_to_unsigned(probe).to(torch.int32)
    packed_by_torch = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 2).reshape(-1)
    for candidate in ((64, True), (32, True), (64, False), (32, False), (16, False)):
        layout = CpuInt4Layout(*candidate)
        if torch.equal(layout.pack(probe), packed_by_torch):
            return layout
    logger.warning("Unknown CPU int4 weight layout in this torch build: 4-bit layers use the slower fallback.")
    return None


# torch.compile calls this once while tracing and keeps the answer, instead of tracing the probe.
@torch.compiler.assume_constant_result
def _cpu_int4_layout():
    return detect_cpu_int4_layout()


def _cpu_int4_kernel_fits(out_features, in_features):
    return CpuInt4Layout.fits(out_features, in_features) and _cpu_int4_layout() is not None


def _cpu_int8_kernel_fits(in_features):
    # The bfloat16 kernel reads out of bounds (crash or garbage) when in_features % 16 != 0 (torch 2.13).
    return in_features % 16 == 0 and _HAS_CPU_INT8_KERNEL


def _only_holder_of_storage(tensor):
    """True when rewriting `tensor` in place is unobservable: no other tensor, process or file shares its memory.

    A checkpoint that transformers memory-maps (`.bin` files, safetensors) hands its tensors over
    as the parameters themselves, in a private mapping: rewriting a weight there turns its file
    pages into the process's own pages one for one, where a converted copy would add a second copy
    of the weights until the last layer has converted and the mapping goes away. A user's state
    dict, a `model.state_dict()` taken before the first forward, a held storage object, tensors
    shared between processes and inference-mode tensors (read-only outside inference mode) get a
    converted copy instead.
    """
    if not hasattr(torch._C, "_storage_Use_Count"):  # private: without it, always copy
        return False
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.is_inference():
        return False
    return not tensor.untyped_storage().is_shared() and _storage_holders(tensor) == _lone_tensor_storage_holders()


def _storage_holders(tensor):
    """(tensors and storage objects holding `tensor`'s storage, Python references to its storage object)."""
    storage = tensor.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


@functools.cache
def _lone_tensor_storage_holders():
    # What `_storage_holders` sees for a tensor nothing else holds, in this torch build: the counts
    # include this lookup's own references, whose number torch versions may change.
    return _storage_holders(torch.empty(1, dtype=torch.int8))


def _as_released(weight, out_features, in_features, cpu_layout):
    """The weight in the released layout: itself, or a converted copy of a CPU int4 kernel layout."""
    if weight.dtype != torch.uint8:
        return weight
    return CpuInt4Layout(*cpu_layout).to_released(weight, out_features, in_features)


# torch's weight-only kernels re-read the weight for every row: from CPU_GEMM_MIN_ROWS[bits] rows on,
# the integers are unpacked to bfloat16 (exact: |q| <= 127) for oneDNN's GEMM instead, where oneDNN has
# one (`_cpu_has_bfloat16_gemm`). The break-evens: bench/README.md, "Figures behind quantization.py".
CPU_GEMM_MIN_ROWS = {8: 64, 4: 192}
# Activation dtypes that take torch's bfloat16 kernels (float16 rounded to bfloat16: its own kernels are
# scalar loops). A float32 model computes in float32, as the published CPU kernels do.
_CPU_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _cpu_has_gemm(dtype):
    """Whether oneDNN multiplies `dtype` (bfloat16 or float16) matrices on this CPU: bfloat16 on AVX-512 and
    newer, float16 with AVX512-FP16 or AMX-FP16. Elsewhere torch multiplies them in a loop."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    supported = getattr(torch.ops.mkldnn, check, None)
    return bool(supported is not None and supported())


# torch.compile calls this once while tracing and keeps the answer.
@torch.compiler.assume_constant_result
def _cpu_has_bfloat16_gemm():
    return _cpu_has_gemm(torch.bfloat16)


def _uses_cpu_gemm(rows, bits):
    return rows >= CPU_GEMM_MIN_ROWS[bits] and _cpu_has_bfloat16_gemm()


def _cpu_int8_linear(x2d, weight, scale):
    x2d_bf16 = x2d.to(torch.bfloat16).contiguous()
    scale_bf16 = scale.to(torch.bfloat16)
    if _uses_cpu_gemm(x2d.shape[0], 8):
        out = F.linear(x2d_bf16, weight.to(torch.bfloat16)).mul_(scale_bf16)
    else:
        out = torch.ops.aten._weight_int8pack_mm(x2d_bf16, weight, scale_bf16)
    return out.to(x2d.dtype)


@functools.cache
def _unit_scales_and_zeros(groups, out_features):
    """The CPU int4 kernel's per-group (scale, zero) table with scale 1 and zero 0, shared by every layer.

    The kernel takes a scale per group of inputs, and ours is one per row: rather than building a
    [groups, out, 2] table per layer and call (a per-token allocation as large as 4% of the weights),
    the kernel multiplies by 1 and the row scale is applied to its output.
    """
    with torch.inference_mode(False):
        table = torch.zeros(groups, out_features, 2, dtype=torch.bfloat16)
        table[..., 0] = 1
    return table


def _cpu_int4_linear(x2d, packed, scale, layout):
    out_features, in_features = scale.shape[0], x2d.shape[1]
    x2d_bf16 = x2d.to(torch.bfloat16).contiguous()
    if _uses_cpu_gemm(x2d.shape[0], 4):
        weight = layout.unpack(packed, out_features, in_features, torch.bfloat16, signed=True)
        out = F.linear(x2d_bf16, weight)
    else:
        group_size = next(size for size in _CPU_INT4_GROUP_SIZES if in_features % size == 0)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2d_bf16,
            packed.view(out_features, in_features // 2),
            group_size,
            _unit_scales_and_zeros(in_features // group_size, out_features),
        )
    return out.mul_(scale.to(torch.bfloat16)).to(x2d.dtype)


# ---------------------------------------------------------------------------------------------
# Optional CPU accelerator: onnxruntime's MatMulNBits
# ---------------------------------------------------------------------------------------------

# The CPU kernels a quantized layer may use (`set_cpu_kernel`; config `quantization_cpu_kernel`):
# - "auto" (the default, `DEFAULT_CPU_KERNEL`): "chatglm_cpu" where its package is installed and the CPU
#   runs it, else "torch", silently: its int8 activations cost little next to the weights' own rounding
#   (bench/quantization_accuracy.py) and spare the int4 file a layout conversion.
# - "torch": the PyTorch paths above; exact weight-only numerics, what the conformance tests use.
# - "onnxruntime": onnxruntime's MatMulNBits (com.microsoft) with accuracy_level 4. It quantizes
#   activations to int8 per block of `MATMULNBITS_BLOCK` inputs and multiplies with integer dot
#   products (ggml's q4_0 x q8_0 numerics), in prebuilt AVX2 / AVX512 / VNNI / AMX / Arm kernels.
#   Optional: `pip install onnxruntime onnx`; without them layers keep the "torch" kernels.
# - "chatglm_cpu": this repository's AVX2 / AVX512-VNNI kernels (`pip install ./cpu_kernels`): the same int8
#   activation numerics (per group of 128 inputs), reading the released bytes where they lie: no
#   conversion at the first forward, no second copy, every byte read once per step. Without the
#   package, or on a CPU without AVX2, layers keep the "torch" kernels (with a warning when asked for by name).
CPU_KERNELS = ("auto", "torch", "onnxruntime", "chatglm_cpu")
DEFAULT_CPU_KERNEL = "auto"
# Inputs per MatMulNBits block: one (repeated) float32 row scale and one activation scale per block.
MATMULNBITS_BLOCK = 128


@functools.cache
def _onnxruntime():
    """(onnxruntime, onnx, numpy) when installed; None, with one warning, when not."""
    try:
        import numpy
        import onnx
        import onnxruntime
    except ImportError as error:
        logger.warning(
            f"cpu_kernel='onnxruntime' needs the onnxruntime and onnx packages ({error}); "
            "quantized layers use the torch CPU kernels instead."
        )
        return None
    return onnxruntime, onnx, numpy


def _external_initializer(onnx, name, data_type, shape, nbytes):
    """A graph initializer whose bytes the session takes from `add_external_initializers`, not from the model."""
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=shape, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "in-memory"), ("offset", "0"), ("length", str(nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _matmulnbits_bytes(weight, width, bits):
    """Released int8 [out, stored] -> MatMulNBits' uint8 [out, width] (rows zero-padded to `width` bytes).

    int4: input 2c goes to the LOW nibble and nibbles become unsigned (+8, i.e. XOR 8); int8: bytes
    become unsigned (XOR 0x80). Padding converts from 0, so it holds the zero point (value 0).
    Computed on int32 words, 4 bytes per lane (AVX2 has 32-bit shifts, not 64-bit arithmetic ones),
    faster than byte-wise ops.
    """
    out_features, stored = weight.shape
    converted = torch.empty(out_features, width, dtype=torch.uint8)
    converted[:, stored:] = 0
    converted[:, :stored] = weight.view(torch.uint8)
    words = converted.view(torch.int32)
    if bits == 4:  # swap each byte's nibbles; the arithmetic shift's sign bits fall under the mask
        low_nibbles = (words >> 4).bitwise_and_(0x0F0F0F0F)
        words.bitwise_left_shift_(4).bitwise_and_(_as_int32(0xF0F0F0F0)).bitwise_or_(low_nibbles)
    words.bitwise_xor_(_as_int32((0x88 if bits == 4 else 0x80) * 0x01010101))
    return converted


def _as_int32(pattern):
    """A 32-bit pattern as the signed int32 that torch's int32 ops take."""
    return pattern - (1 << 32) if pattern >= 1 << 31 else pattern


def _call_linux_libc(function, *args):
    """Call the C library's `function` through ctypes on Linux; best effort: nothing elsewhere, or where it is missing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        getattr(ctypes.CDLL(None), function)(*args)
    except (OSError, AttributeError):
        pass


def _release_free_heap():
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`); best effort.

    onnxruntime's packing frees its temporaries into the C heap, which keeps them resident (bench/README.md,
    "Figures behind quantization.py").
    """
    _call_linux_libc("malloc_trim", 0)


class MatMulNBits:
    """One quantized matrix in an onnxruntime session: `self(x)` = x @ W.T for float32 x [M, K].

    The session is built from the released bytes (`weight`, `scale` [N]) without a copy inside the
    model proto: MatMulNBits takes unsigned nibbles with zero point 8 (int8: bytes with zero point
    128), input 2c in the LOW nibble, rows padded to whole blocks, and a float32 scale per block (the
    row scale repeated). onnxruntime packs that into its own kernel layout when the session is
    created; the converted temporary is then dropped, so the session holds the one working copy
    while the layer's `weight` keeps the released bytes for `state_dict()`. Its memory per matrix and per
    session (bench/README.md) make it opt-in.
    """

    def __init__(self, weight, scale, bits):
        onnxruntime, onnx, self._numpy = _onnxruntime()
        out_features, stored = weight.shape
        in_features = stored * 8 // bits
        blocks = -(-in_features // MATMULNBITS_BLOCK)
        converted = _matmulnbits_bytes(weight.detach(), blocks * MATMULNBITS_BLOCK * bits // 8, bits)
        scales = scale.detach().float()[:, None].expand(out_features, blocks).clone(memory_format=torch.contiguous_format)
        shapes = {"B": [out_features, blocks, MATMULNBITS_BLOCK * bits // 8], "scales": [out_features * blocks]}
        values = {"B": converted, "scales": scales}
        types = {"B": onnx.TensorProto.UINT8, "scales": onnx.TensorProto.FLOAT}
        helper = onnx.helper
        node = helper.make_node(
            "MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
            K=in_features, N=out_features, bits=bits, block_size=MATMULNBITS_BLOCK, accuracy_level=4,
        )
        graph = helper.make_graph(
            [node],
            "quantized_linear",
            [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, ["M", in_features])],
            [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["M", out_features])],
            initializer=[
                _external_initializer(onnx, name, types[name], shapes[name], values[name].nbytes) for name in shapes
            ],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # torch's pool size; the two never run at once
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no spinning against torch
        options.enable_cpu_mem_arena = False
        # Graph optimizations stay on: without them a batch-1 call is slower.
        initializers = [onnxruntime.OrtValue.ortvalue_from_numpy(values[name].view(shapes[name]).numpy()) for name in shapes]
        options.add_external_initializers(list(shapes), initializers)
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.in_features, self.out_features = in_features, out_features
        # onnxruntime packs constant weights and their scales into its own layout; where it did not
        # (a CPU without its kernels), it reads the buffers given here at every call: keep them then.
        probe = torch.ones(1, in_features)
        before = self(probe)
        scales.zero_()
        reads_buffers = not torch.equal(self(probe), before)
        scales.copy_(scale.detach().float()[:, None].expand(out_features, blocks))
        self._kept = (converted, scales, initializers) if reads_buffers else None
        del converted, scales, initializers
        _release_free_heap()

    def __call__(self, x2d):
        """float32 [M, K] (rows contiguous) -> float32 [M, N], bound to the session without copies."""
        rows = x2d.shape[0]
        out = torch.empty(rows, self.out_features, dtype=torch.float32)
        if rows == 0:
            return out
        x2d = x2d.contiguous()
        binding = self.session.io_binding()
        binding.bind_input("A", "cpu", 0, self._numpy.float32, [rows, self.in_features], x2d.data_ptr())
        binding.bind_output("Y", "cpu", 0, self._numpy.float32, [rows, self.out_features], out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


# The oldest chatglm_cpu these files call: 0.4's `FloatWeight` takes any number of rows.
CHATGLM_CPU_MIN_VERSION = (0, 4)


@functools.cache
def _chatglm_cpu_or_why_not():
    """(the chatglm_cpu package, None) when installed, recent enough and able to run on this CPU; (None, the
    reason) when not."""
    try:
        import chatglm_cpu
    except ImportError as error:
        return None, f"needs the chatglm_cpu package (pip install ./cpu_kernels from this repository; {error})"
    installed = getattr(chatglm_cpu, "__version__", "0.1")
    if tuple(int(part) for part in installed.split(".")[:2]) < CHATGLM_CPU_MIN_VERSION:
        wanted = ".".join(map(str, CHATGLM_CPU_MIN_VERSION))
        return None, (
            f"needs chatglm_cpu {wanted} or newer, found {installed} "
            "(pip install --force-reinstall ./cpu_kernels from this repository)"
        )
    if not chatglm_cpu.available():
        return None, "this CPU has no AVX2/FMA/F16C"
    return chatglm_cpu, None


@functools.cache
def _chatglm_cpu_ops():
    """chatglm_cpu's torch operators (`torch.ops.chatglm_cpu`), registered at first use; None where the installed
    package has none (before 0.4.2) or torch cannot define them (before 2.4): torch.compile then traces the exact
    path instead."""
    try:
        import chatglm_cpu.ops  # noqa: F401 (registers them)
    except (ImportError, AttributeError):
        return None
    return torch.ops.chatglm_cpu


@functools.cache
def _chatglm_cpu():
    """The chatglm_cpu package when usable here (`_chatglm_cpu_or_why_not`); None, with one warning, when not."""
    package, why_not = _chatglm_cpu_or_why_not()
    if package is None:
        logger.warning(f"cpu_kernel='chatglm_cpu' {why_not}; quantized layers use the torch CPU kernels instead.")
    return package


# What the chatglm_cpu kernel reads and writes; other dtypes (float64) take the exact path.
_CHATGLM_CPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _in_dual_level():
    """Inside forward-mode AD's dual level (`torch.autograd.forward_ad.dual_level`), where outputs need tangents."""
    return torch.autograd.forward_ad._current_level >= 0


def _traced_or_transformed():
    """Inside torch.func's transforms (vmap, grad, jvp), whose tensors have no data pointer for a C kernel,
    inside forward-mode AD's dual level (the kernel's output would carry no tangent), or while torch.jit
    traces (a trace would record only the kernel's empty output tensor)."""
    return (
        torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0  # `_in_dual_level()`, inline: it runs for every projection
        or torch._C._is_tracing()
    )


def _takes_torchs_path_only():
    """While torch.compile traces (our kernels would break its graph; `fullgraph=True` refuses them), under
    the CPU's autocast (which chooses the dtypes of torch's own operators), inside torch.func's transforms
    and torch.jit's tracing: torch's operators, not ours."""
    return _is_compiling() or _autocast_on_cpu() or _traced_or_transformed()


_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, nn.Parameter, type(None)))


def _plain(*tensors):
    """Whether none of `tensors` (None allowed) is a tensor subclass (torchao's quantized weights, DTensor):
    a subclass's data pointer is not its values' memory, and our C kernels read memory."""
    return _PLAIN_TENSOR_TYPES.issuperset(map(type, tensors))


def _may_keep_kernel_handle(module):
    """Whether `module` may keep its kernel handle (which holds its weights) between calls: not under an
    accelerate hook, which may move the weights off after each call (offloading) and would find this call's
    copy still held."""
    return getattr(module, "_hf_hook", None) is None


def _chatglm_cpu_linear(x, handle, **options):
    """`handle` (a chatglm_cpu QuantizedWeight or FloatWeight) applied to the rows of x [..., K]."""
    rows = x.reshape(-1, x.shape[-1])
    # Named for torch.profiler only while one runs: entering a name costs every call otherwise.
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function("chatglm_cpu::linear"):
            out = handle(rows, **options)
    else:
        out = handle(rows, **options)
    return out.view(*x.shape[:-1], out.shape[-1])


def chatglm_cpu_attention(query, key, value, mask, scaling):
    """chatglm_cpu's attention of one query per sequence (`chatglm_cpu.attend`): query [B, H, D], key and value
    [B, G, T, D], mask None or boolean [B, T]; None where it cannot run (package missing or too old,
    float64, tensor subclasses, gradients wanted, compiling, autocast, tracing, torch.func, forward-mode AD), for
    the caller to compute it with torch."""
    if _takes_torchs_path_only():
        return None
    package = _chatglm_cpu()
    if package is None:
        return None
    tensors = (query, key, value)
    if any(t.dtype not in _CHATGLM_CPU_FLOATS for t in tensors) or key.dtype != value.dtype or query.shape[-1] % 8:
        return None
    if not _plain(*tensors, mask):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return _chatglm_cpu_attend(package, query, key, value, mask, scaling)


def _chatglm_cpu_attend(package, query, key, value, mask, scaling):
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function("chatglm_cpu::attend"):
            return package.attend(query, key, value, mask, scaling)
    return package.attend(query, key, value, mask, scaling)


# ---------------------------------------------------------------------------------------------
# CUDA kernel (Triton)
# ---------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _dequantize_matmul_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        BITS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[M, N] = x[M, K] @ (q[N, K] * scale[N, None]).T (+ bias), q read from the released layout."""
        # 64-bit row offsets: M * K or M * N passes 2**31 for long batched prompts.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :],
                mask=(rows[:, None] < M) & (ks[None, :] < K),
                other=0.0,
            )
            w_mask = (ks[:, None] < K) & (cols[None, :] < N)
            if BITS == 8:
                q = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0).to(tl.int32)
            else:
                byte = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] // 2, mask=w_mask, other=0)
                # Even k: high nibble, odd k: low nibble. Shift it to the top of an int32, then an
                # arithmetic shift back down sign-extends it.
                q = (byte.to(tl.int32) << (24 + 4 * (ks[:, None] % 2))) >> 28
            # Through float32: exact for |q| <= 127, and Triton's interpreter cannot cast int to bfloat16.
            acc += tl.dot(x, q.to(tl.float32).to(x.dtype))
        acc *= tl.load(scale_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + rows[:, None] * stride_om + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=(rows[:, None] < M) & (cols[None, :] < N),
        )


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by phase and GPU generation. Decode (<= 16
# rows) only reads the weight: narrow column tiles spread it over more SMs; prefill tiles reuse each
# dequantized weight tile across many rows. Turing's smaller tiles keep its dots in registers: the
# Ampere ones spill there (tests/test_triton_targets.py compiles every target and checks for spills).
TRITON_TILES = {
    ("decode", "ampere"): (16, 32, 128, 4, 4),
    ("decode", "turing"): (16, 32, 64, 4, 2),
    ("prefill", "ampere"): (64, 128, 64, 8, 3),
    ("prefill", "turing"): (32, 64, 32, 4, 2),
}


def triton_tiles(rows, capability):
    """The TRITON_TILES entry for a call with `rows` activation rows on a GPU of compute `capability`."""
    return TRITON_TILES["decode" if rows <= 16 else "prefill", "ampere" if capability >= (8, 0) else "turing"]


def _triton_linear(x2d, weight, scale, bias, bits, tiles=None):
    """x2d [M, K] (float16/bfloat16, rows contiguous) times the released-layout weight, + bias.

    `tiles` defaults to the TRITON_TILES entry of x2d's GPU.
    """
    m, k = x2d.shape
    n = scale.shape[0]
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    block_m, block_n, block_k, num_warps, num_stages = tiles or triton_tiles(m, torch.cuda.get_device_capability(x2d.device))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _dequantize_matmul_kernel[grid](
        x2d,
        weight,
        scale,
        bias if bias is not None else scale,  # any valid pointer; not read when HAS_BIAS is False
        out,
        m,
        n,
        k,
        x2d.stride(0),
        weight.stride(0),
        out.stride(0),
        BITS=bits,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# (device, dtype, bits) -> True once the kernel ran there, False once compiling it failed.
_triton_status = {}


def _cuda_linear(x2d, weight, scale, bias, bits):
    key = (x2d.device, x2d.dtype, bits)
    if _triton_status.get(key) is False:
        return _fallback_linear(x2d, weight, scale, bias, bits)
    try:
        out = _triton_linear(x2d, weight, scale, bias, bits)
    except Exception as error:
        if _triton_status.get(key):
            raise  # it compiled and ran before: a real error, not an unsupported GPU or toolchain
        _triton_status[key] = False
        logger.warning(
            f"Triton could not run the {bits}-bit kernel on {x2d.device} for {x2d.dtype} ({error!r}); "
            "using the slower dequantizing fallback."
        )
        return _fallback_linear(x2d, weight, scale, bias, bits)
    _triton_status[key] = True
    return out


# ---------------------------------------------------------------------------------------------
# Backends: how one layer computes, chosen when its weights, device or kernel setting change
# ---------------------------------------------------------------------------------------------


def _fallback_linear(x2d, weight, scale, bias, bits, cpu_layout=None):
    """Portable, exact path: dequantize to the activations' dtype and multiply in it.

    For a float32 model these are the published CPU kernels' numerics (float32 weights, float32
    matmul). `weight` is the released layout, or uint8 in the CPU int4 layout `cpu_layout`.
    """
    scale = scale.to(x2d.dtype)
    if weight.dtype == torch.uint8:
        weight = cpu_layout.unpack(weight, scale.shape[0], x2d.shape[1], x2d.dtype, signed=True)
        weight.mul_(scale[:, None])
    else:
        weight = dequantize_weight(weight, scale, bits)
    return F.linear(x2d, weight, bias.to(x2d.dtype) if bias is not None else None)


def _dequantized_linear(layer, x2d):
    parameters = layer._parameters  # not through nn.Module.__getattr__: these run for every projection
    return _fallback_linear(
        x2d, parameters["weight"], parameters["weight_scale"], parameters["bias"], layer.bits, layer._cpu_layout
    )


def _with_bias(out, bias):
    return out if bias is None else out + bias.to(out.dtype)


def _parameters_key(module):
    """What a backend was made for: its parameters' addresses, and the weight's shape. Parameters assigned,
    loaded or moved through the module drop the backend; this catches the rest (accelerate's
    `_parameters[name] = ...`, `.data = ...`), whose new tensors a kept handle would not see."""
    parameters = module._parameters  # no comprehension: this runs for every projection
    weight, scale, bias = parameters["weight"], parameters.get("weight_scale"), parameters["bias"]
    return weight.data_ptr(), weight.shape, scale is not None and scale.data_ptr(), bias is not None and bias.data_ptr()


class Dequantize:
    """Exact on every device and dtype: the weight dequantized to the activations' dtype, then `F.linear` (a
    float32 model gets the published CPU kernels' numerics). The reference the other backends are tested against."""

    exact = True

    @staticmethod
    def fits(layer):
        return True

    def __init__(self, layer):
        layer._use_cpu_layout(None)

    def __call__(self, layer, x2d):
        return _dequantized_linear(layer, x2d)


class _TorchWeightOnly:
    """torch's weight-only CPU kernels for a few rows (decode) and, from CPU_GEMM_MIN_ROWS rows on, the integers
    unpacked to bfloat16 for oneDNN's GEMM. float32 activations take the exact path (a float32 model asked for
    float32 numerics)."""

    exact = True

    @classmethod
    def fits(cls, layer):
        return layer.bits == cls.bits and layer.weight.device.type == "cpu" and cls.kernel_fits(layer)

    def __call__(self, layer, x2d):
        if x2d.dtype not in _CPU_KERNEL_DTYPES:
            return _dequantized_linear(layer, x2d)
        parameters = layer._parameters
        return _with_bias(self.multiply(layer, x2d, parameters["weight"], parameters["weight_scale"]), parameters["bias"])


class TorchInt4(_TorchWeightOnly):
    """4 bits: the weight is rewritten once into the kernel's layout (`CpuInt4Layout`)."""

    bits = 4

    @staticmethod
    def kernel_fits(layer):
        return _cpu_int4_kernel_fits(layer.out_features, layer.in_features)

    def __init__(self, layer):
        layer._use_cpu_layout(_cpu_int4_layout())

    @staticmethod
    def multiply(layer, x2d, weight, scale):
        return _cpu_int4_linear(x2d, weight, scale, layer._cpu_layout)


class TorchInt8(_TorchWeightOnly):
    """8 bits, on the released bytes."""

    bits = 8

    @staticmethod
    def kernel_fits(layer):
        return _cpu_int8_kernel_fits(layer.in_features)

    def __init__(self, layer):
        layer._use_cpu_layout(None)

    @staticmethod
    def multiply(layer, x2d, weight, scale):
        return _cpu_int8_linear(x2d, weight, scale)


class Triton:
    """CUDA: one fused dequantize-and-multiply Triton kernel reading the released layout; where it fails to
    compile (an unsupported GPU or toolchain), the exact path, with one warning."""

    exact = True
    # Tensor-core dots need Turing+ for float16 and Ampere+ for bfloat16.
    MIN_CAPABILITY = {torch.float16: (7, 5), torch.bfloat16: (8, 0)}

    @staticmethod
    def fits(layer):
        weight = layer.weight
        return (
            _HAS_TRITON
            and weight.device.type == "cuda"
            and any(torch.cuda.get_device_capability(weight.device) >= need for need in Triton.MIN_CAPABILITY.values())
        )

    def __init__(self, layer):
        layer._use_cpu_layout(None)
        capability = torch.cuda.get_device_capability(layer.weight.device)
        self.dtypes = {dtype for dtype, need in self.MIN_CAPABILITY.items() if capability >= need}

    def __call__(self, layer, x2d):
        if x2d.dtype not in self.dtypes or x2d.device != layer.weight.device:
            return _dequantized_linear(layer, x2d)
        return _cuda_linear(x2d.contiguous(), layer.weight.contiguous(), layer.weight_scale, layer.bias, layer.bits)


class OnnxRuntime:
    """onnxruntime's MatMulNBits, when `cpu_kernel` is "onnxruntime": int8 activations per block of
    MATMULNBITS_BLOCK inputs, integer dot products. Its session packs its own copy of the weight; the released
    bytes stay the layer's `weight` (for `state_dict()`) and are paged out where a file backs them."""

    exact = False

    @staticmethod
    def fits(layer):
        return layer.cpu_kernel == "onnxruntime" and layer.weight.device.type == "cpu" and _onnxruntime() is not None

    @torch.compiler.disable
    def __init__(self, layer):
        layer._use_cpu_layout(None)
        with torch.inference_mode(False):
            self.matmul = MatMulNBits(layer.weight, layer.weight_scale, layer.bits)
        if self.matmul._kept is None:
            _page_out(layer.weight)

    def __call__(self, layer, x2d):
        if _traced_or_transformed():
            return _dequantized_linear(layer, x2d)
        return _onnxruntime_linear(self.matmul, x2d, layer.bias)


class ChatGLMCpu:
    """This repository's AVX2 / AVX512-VNNI kernels (chatglm_cpu), when `cpu_kernel` is "chatglm_cpu": int8
    activations per group of 128 inputs, reading the released bytes where they lie. Also applies an RMSNorm or
    a SwiGLU to its input on the way in (`fused`). Inputs it cannot take (tensor subclasses, float64, torch.func,
    forward-mode AD, torch.jit tracing) take the exact path."""

    exact = False

    @staticmethod
    def fits(layer):
        weight, scale, bias = layer.weight, layer.weight_scale, layer.bias
        return (
            layer.cpu_kernel == "chatglm_cpu"
            and weight.device.type == "cpu"
            and layer.in_features % 32 == 0
            and scale.dtype in _CHATGLM_CPU_FLOATS
            and (bias is None or bias.dtype in _CHATGLM_CPU_FLOATS)
            and _plain(weight, scale, bias)
            and _chatglm_cpu() is not None
        )

    def __init__(self, layer):
        layer._use_cpu_layout(None)
        # Under an accelerate hook, which may move the weights off after each call, the handle (which holds
        # them) is made per call rather than kept.
        self.handle = self.handle_for(layer) if _may_keep_kernel_handle(layer) else None
        self.ops = _chatglm_cpu_ops()

    @staticmethod
    def handle_for(layer):
        return _chatglm_cpu().QuantizedWeight(layer.weight, layer.weight_scale, layer.bias, layer.bits)

    @staticmethod
    def takes(x):
        return x.is_cpu and x.dtype in _CHATGLM_CPU_FLOATS and type(x) is torch.Tensor and not _traced_or_transformed()

    def fused(self, layer, x, **options):
        """`layer` applied to x [..., K] with chatglm_cpu's `options` (rms_norm=, swiglu=), or None where x is
        not something the kernel takes."""
        return _chatglm_cpu_linear(x, self.handle or self.handle_for(layer), **options) if self.takes(x) else None

    def __call__(self, layer, x2d):
        if _is_compiling():
            return self.traced(layer, x2d)
        if self.takes(x2d):
            return _chatglm_cpu_linear(x2d, self.handle or self.handle_for(layer))
        return _dequantized_linear(layer, x2d)

    def traced(self, layer, x2d):
        """While torch.compile traces: the kernel as the operator `chatglm_cpu::linear`, which its graph keeps."""
        if self.ops is None or x2d.dtype not in _CHATGLM_CPU_FLOATS:
            return _dequantized_linear(layer, x2d)
        parameters = layer._parameters
        return self.ops.linear(x2d, parameters["weight"], parameters["weight_scale"], parameters["bias"], layer.bits)


# Which backend a quantized layer computes with: the first that fits it, tried when its weights, device or
# `cpu_kernel` change (never per call). The README's "Quantization: which backend runs where" says why each is here.
QUANTIZED_BACKENDS = (OnnxRuntime, ChatGLMCpu, TorchInt4, TorchInt8, Triton, Dequantize)


class _QuantizedLinearFunction(torch.autograd.Function):
    """Frozen quantized weight: the forward runs an exact backend, the backward gives grad @ dequantized W."""

    @staticmethod
    def forward(ctx, x2d, weight, scale, bias, layer, compute):
        ctx.save_for_backward(weight, scale)
        ctx.bits = layer.bits
        ctx.cpu_layout = layer._cpu_layout
        ctx.has_bias = bias is not None
        ctx.in_features = x2d.shape[1]
        return compute(layer, x2d)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            released = _as_released(weight, scale.shape[0], ctx.in_features, ctx.cpu_layout)
            grad_x = grad_out @ dequantize_weight(released, scale, ctx.bits).to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(0)
        return grad_x, None, None, grad_bias, None, None


_MADV_PAGEOUT = 21  # Linux >= 5.4
_MADV_POPULATE_READ = 22  # Linux >= 5.14
PREFAULT_THREAD_NAME = "chatglm-prefault"


def _page_span(tensor):
    """[start, end) of a CPU tensor's bytes, the start rounded down to its page."""
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    return start, tensor.data_ptr() + tensor.numel() * tensor.element_size()


def _file_mappings():
    """[(start, end)] of this process's memory-mapped files (Linux /proc/self/maps); empty elsewhere."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        # address perms offset device inode [path]: a file mapping has an inode and a path
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            spans.append((int(start, 16), int(end, 16)))
    return spans


def populate(tensors, stop=None):
    """Map the pages under each CPU tensor into this process now, in the given order (madvise
    MADV_POPULATE_READ: one call per tensor instead of a page fault per few pages in the first forward;
    pages not in the page cache are read from the file), until the `threading.Event` `stop` is set.
    Best effort: nothing where Linux lacks it."""
    for tensor in tensors:
        if stop is not None and stop.is_set():
            return
        if tensor.device.type == "cpu" and tensor.numel():
            start, end = _page_span(tensor)
            _call_linux_libc("madvise", ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_POPULATE_READ)


def prefault_mapped_weights(model):
    """Start mapping, on a daemon thread, the pages of the memory-mapped weights that every forward reads whole
    (all but the input embedding, of which a step reads one row per token); returns the thread, or None when no
    weight lies in a mapped file.

    A checkpoint loaded as stored stays memory-mapped (transformers keeps its tensors as the parameters), so
    the first forward took a page fault for every few pages of it, in the kernels' threads; this thread maps
    them in forward order while the caller goes on (tokenizer, prompt, the first forward itself). Weights
    converted at load are anonymous memory, resident already, and are left alone. The thread holds the
    tensors until it is done, so their mapping cannot go away under it. `stop_prefaulting` stops it: at exit,
    since a daemon thread still running at shutdown is ended wherever it stands (which aborted a process that
    exited right after loading: "terminate called without an active exception"), and before a layout
    conversion in place.
    """
    spans = _file_mappings()
    embedding = model.get_input_embeddings()
    skipped = {id(embedding.weight)} if embedding is not None else set()

    def mapped(tensor):
        address = tensor.data_ptr()
        return any(start <= address < end for start, end in spans)

    tensors = [
        tensor.detach()
        for tensor in list(model.parameters()) + list(model.buffers())
        if id(tensor) not in skipped and tensor.device.type == "cpu" and tensor.numel() and mapped(tensor)
    ]
    if not tensors:
        return None
    stop = threading.Event()
    thread = threading.Thread(target=_prefault, args=(tensors, stop), name=PREFAULT_THREAD_NAME, daemon=True)
    if not _prefault_threads:
        atexit.register(stop_prefaulting)  # (registering it again would only run it twice)
    _prefault_threads[thread] = stop
    thread.start()
    return thread


# The running threads of `prefault_mapped_weights`, each with the event that stops it.
_prefault_threads = {}


def _prefault(tensors, stop):
    try:
        populate(tensors, stop)
    finally:
        _prefault_threads.pop(threading.current_thread(), None)


def stop_prefaulting():
    """Stop the threads of `prefault_mapped_weights` between two tensors and wait for them. They hold the
    tensors they map, which an in-place layout conversion would count as other holders of the weight (and so
    copy it), and must not run into the interpreter's shutdown (at exit, this runs before it)."""
    for thread, stop in list(_prefault_threads.items()):
        stop.set()
        thread.join()


def _page_out(tensor):
    """Ask Linux to reclaim the pages under `tensor` (madvise MADV_PAGEOUT); best effort, never loses data.

    Clean pages of a memory-mapped checkpoint are dropped (and read again from the file if the tensor
    is used, e.g. by `state_dict()`); anonymous and written pages stay where there is no swap, or are
    swapped out. After onnxruntime has packed its copy of a weight, this keeps the released bytes of
    a checkpoint loaded as stored out of resident memory.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start, end = _page_span(tensor)
    _call_linux_libc("madvise", ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


@torch.compiler.disable
def _onnxruntime_linear(matmul, x, bias):
    # Named for torch.profiler, which does not see inside onnxruntime.
    with torch.profiler.record_function("onnxruntime::MatMulNBits"):
        out = matmul(x.reshape(-1, x.shape[-1]).float()).to(x.dtype)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------


class _ChoosesBackend:
    """A module that computes with the first of its class's BACKENDS that fits it, made again when its parameters,
    device or `cpu_kernel` change (`set_cpu_kernel` and the loaders drop `_backend`; `_parameters_key` catches
    tensors swapped behind the module's back)."""

    @property
    def backend(self):
        """The BACKENDS instance this layer computes with, chosen again only when its parameters changed."""
        backend = self._backend
        if backend is None or backend.key != _parameters_key(self):
            backend = self._choose_backend()
        return backend

    @torch.compiler.disable  # once per layer; torch.compile resumes with the chosen backend
    def _choose_backend(self):
        self._backend = None  # its handle may alias the weight (an in-place conversion) or keep old tensors alive
        backend = next(kind for kind in self.BACKENDS if kind.fits(self))(self)
        backend.key = _parameters_key(self)  # after its layout conversion
        self._backend = backend
        return backend

    def __getstate__(self):
        # Without the backend, which may hold C objects on the addresses of the module's own tensors: a copy
        # chooses its own at its first forward, and unpickling needs no kernel package.
        return {**super().__getstate__(), "_backend": None}

    def _apply(self, *args, **kwargs):
        # Moved or converted (`.to`, `.float()`, `.cuda()`): the backend keeps the old tensors alive.
        self._backend = None
        return super()._apply(*args, **kwargs)


class QuantizedLinear(_ChoosesBackend, nn.Module):
    """`nn.Linear` with a frozen int8 / int4 weight in the released checkpoint format.

    Parameters: `weight` (int8 [out, in] for 8 bits, [out, in/2] for 4 bits), `weight_scale`
    ([out], model dtype) and optional `bias` ([out], model dtype); `state_dict()` always holds them
    in that released format.

    It computes with one of QUANTIZED_BACKENDS, chosen when its parameters, device or `cpu_kernel` change
    (`backend`). One copy of the weight: the `TorchInt4` backend rewrites `weight` into PyTorch's CPU int4
    layout; the same Parameter then holds flat uint8 data of the same size, written over the released bytes
    when no other tensor shares them (`_only_holder_of_storage`). Saving converts back, and so does choosing
    any other backend; the kernel layout is never written anywhere. Its distinct dtype and shape mark it, so a
    loader that writes a released tensor into a converted layer fails its shape check instead of mixing layouts.
    """

    BACKENDS = QUANTIZED_BACKENDS

    def __init__(self, in_features, out_features, bits, bias=True, dtype=None, device=None):
        super().__init__()
        _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 packs two inputs per byte: in_features must be even, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        dtype = dtype or torch.get_default_dtype()
        # Left uninitialized: the weight comes from a checkpoint or from `from_linear`.
        self.weight = nn.Parameter(
            torch.empty(out_features, _packed_width(in_features, bits), dtype=torch.int8, device=device),
            requires_grad=False,
        )
        self.weight_scale = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        # Which CPU int4 layout `weight` holds while it is uint8 (it travels with a pickled module).
        self._cpu_layout = None
        # One of CPU_KERNELS but "auto" (`set_cpu_kernel` resolves it).
        self.cpu_kernel = "torch"
        self._backend = None

    @classmethod
    def from_linear(cls, linear, bits):
        """Quantize an `nn.Linear` where its weight lives; the bias parameter is shared, not copied."""
        qweight, scale = quantize_weight(linear.weight.detach(), bits)
        module = cls(linear.in_features, linear.out_features, bits, bias=False, dtype=scale.dtype, device="meta")
        module.weight = nn.Parameter(qweight, requires_grad=False)
        module.weight_scale = nn.Parameter(scale, requires_grad=False)
        module.bias = linear.bias
        return module

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"

    # -- checking what loaders put in ---------------------------------------------------------

    def check_loaded_tensor(self, name, tensor, key=None):
        """Raise ValueError unless `tensor` can be this layer's `name` ('weight', 'weight_scale', 'bias').

        `key` names the tensor in messages (the checkpoint key); a float [out, in] weight means an
        unquantized checkpoint, an int8 weight of the other width a checkpoint of the other bit width.
        """
        key = key or name
        shape = tuple(tensor.shape)
        if name == "weight":
            check_stored_weight(key, tensor.dtype, shape, self.out_features, self.in_features, self.bits)
            return
        if name in ("weight_scale", "bias"):
            if tensor.is_floating_point() and shape == (self.out_features,):
                return
            raise ValueError(
                f"{key}: expected a floating point tensor of shape {(self.out_features,)}, "
                f"got {tensor.dtype} of shape {shape}"
            )
        raise ValueError(f"QuantizedLinear has no tensor named {name!r}")

    def __setattr__(self, name, value):
        # Loaders that assign tensors (transformers 5, `load_state_dict(assign=True)`, users) come
        # through here, the others through `_load_from_state_dict`: the stored tensors are checked
        # once, where they enter the layer, and `forward` checks nothing.
        if name in ("weight", "weight_scale", "bias") and isinstance(value, torch.Tensor) and "bits" in self.__dict__:
            in_cpu_layout = (
                name == "weight"
                and value.dtype == torch.uint8
                and value.dim() == 1
                and value.numel() * 2 == self.out_features * self.in_features
            )
            if not in_cpu_layout:
                self.check_loaded_tensor(name, value)
            self.__dict__["_backend"] = None  # made for the old tensor
        super().__setattr__(name, value)

    # -- layouts and backend ------------------------------------------------------------------

    def released_weight(self):
        """The weight in the released layout (a converted copy while it is in the CPU kernel layout)."""
        return _as_released(self.weight.detach(), self.out_features, self.in_features, self._cpu_layout)

    def _use_cpu_layout(self, cpu_layout):
        """Put `weight` in torch's CPU int4 layout `cpu_layout`, or in the released layout for None."""
        current = self._cpu_layout if self.weight.dtype == torch.uint8 else None
        if current != cpu_layout:
            self._convert_weight(cpu_layout)

    def _convert_weight(self, cpu_layout):
        # A normal tensor even under inference_mode, so later training can still save it for backward;
        # `.data` keeps the Parameter object that optimizers, hooks and tied-weight maps may hold.
        with torch.inference_mode(False):
            if cpu_layout is None:
                converted = self.released_weight()
            else:
                stop_prefaulting()  # its thread holds the weight too
                in_place = _only_holder_of_storage(self.weight)  # before `detach` adds a holder
                released = self.weight.detach()
                if in_place:
                    converted = released.view(torch.uint8).view(-1)
                else:
                    converted = torch.empty(released.numel(), dtype=torch.uint8)
                cpu_layout.pack_into(released, converted)
            if self.weight.is_inference():
                # Made under inference_mode (`quantize` called there): such a Parameter cannot take
                # normal data, and nothing that trains can hold it.
                self.weight = nn.Parameter(converted, requires_grad=False)
            else:
                self.weight.data = converted
        self._cpu_layout = cpu_layout

    def _requires_grad(self, inputs):
        """Whether any of `inputs` or the bias wants a gradient; the callers ask only in grad mode."""
        bias = self._parameters["bias"]
        return any(t.requires_grad for t in inputs) or (bias is not None and bias.requires_grad)

    def _fused(self, x, inputs, **options):
        """`self` applied to x with chatglm_cpu's fused `options`, or None where that backend does not run it or
        one of `inputs` (x and what the options read) wants a gradient."""
        if _is_compiling() or (torch.is_grad_enabled() and self._requires_grad(inputs)):
            return None
        backend = self.backend
        return backend.fused(self, x, **options) if type(backend) is ChatGLMCpu else None

    def forward_after_rms_norm(self, x, norm_weight, eps):
        """`self(rms_norm(x))` as one chatglm_cpu call that applies the norm while it quantizes x (float32
        throughout, the normed x never rounded to x's dtype); None where that path does not run (gradients
        wanted, another backend, not on the CPU): the caller then applies the norm itself."""
        if x.shape[-1] != self.in_features or not norm_weight.is_cpu or norm_weight.dtype not in _CHATGLM_CPU_FLOATS:
            return None
        return self._fused(x, (x, norm_weight), rms_norm=(norm_weight, eps))

    def forward_after_swiglu(self, x):
        """`self(silu(gate) * up)` for x = [gate | up] (2 * in_features wide), as one chatglm_cpu call that applies
        the SwiGLU while it quantizes x (float32 throughout, the product never rounded to x's dtype); None where
        that path does not run: the caller then computes the product itself."""
        if x.shape[-1] != 2 * self.in_features:
            return None
        return self._fused(x, (x,), swiglu=True)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.dtype == torch.uint8:
            destination[prefix + "weight"] = self.released_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._backend = None  # weights written in place keep their addresses: made again at the next forward
        for name in ("weight", "weight_scale", "bias"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is not None:
                self.check_loaded_tensor(name, state_dict[key], key)
        if prefix + "weight" in state_dict and self.weight.dtype == torch.uint8:
            self._convert_weight(None)  # the incoming weight is in the released layout
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # -- compute ------------------------------------------------------------------------------

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects inputs of width {self.in_features}, got shape {tuple(x.shape)}")
        backend = self._backend
        # Not `self.backend`: no check of the parameters while torch.compile traces.
        if backend is None or (not _is_compiling() and backend.key != _parameters_key(self)):
            backend = self._choose_backend()
        x2d = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and self._requires_grad((x,)):
            parameters = self._parameters
            compute = backend if backend.exact else _dequantized_linear
            out = _QuantizedLinearFunction.apply(
                x2d, parameters["weight"], parameters["weight_scale"], parameters["bias"], self, compute
            )
        elif _in_dual_level():
            # The integer kernels have no tangent formula: dequantize and multiply, exactly, in torch's operators.
            out = _dequantized_linear(self, x2d)
        else:
            out = backend(self, x2d)
        return out.view(*x.shape[:-1], self.out_features)


class TorchLinear:
    """`nn.Linear`'s own forward."""

    @staticmethod
    def fits(layer):
        return True

    def __init__(self, layer):
        pass

    def __call__(self, layer, x):
        return F.linear(x, layer._parameters["weight"], layer._parameters["bias"])


class ChatGLMCpuFloat:
    """chatglm_cpu's float kernel, when `cpu_kernel` is "chatglm_cpu", for float16/bfloat16 weights and inference
    (no gradient wanted) with x in the weight's dtype: decode steps (up to chatglm_cpu.FLOAT_PASS_ROWS rows) read
    the weight at the memory's bandwidth, where torch's matmul of one row does not; prompts too where oneDNN has
    no GEMM in the weight's dtype (`_cpu_has_gemm`). Products are exact, added in float32 in another order than
    torch's. Everything else, and whatever torch must see (compile, autocast, tracing), is `nn.Linear`'s forward."""

    @staticmethod
    def fits(layer):
        weight, bias = layer.weight, layer.bias
        return (
            layer.cpu_kernel == "chatglm_cpu"
            and weight.is_cpu
            and weight.is_contiguous()
            and weight.dtype in _CPU_KERNEL_DTYPES
            and layer.in_features % 32 == 0
            and (bias is None or bias.dtype in _CHATGLM_CPU_FLOATS)
            and _plain(weight, bias)
            and _chatglm_cpu() is not None
        )

    def __init__(self, layer):
        self.pass_rows = _chatglm_cpu().FLOAT_PASS_ROWS
        self.prompts_too = not _cpu_has_gemm(layer.weight.dtype)
        self.handle = self.handle_for(layer) if _may_keep_kernel_handle(layer) else None

    @staticmethod
    def handle_for(layer):
        return _chatglm_cpu().FloatWeight(layer.weight, layer.bias)

    def __call__(self, layer, x):
        weight, bias = layer._parameters["weight"], layer._parameters["bias"]
        rows = x.numel() // layer.in_features
        if (
            x.dtype != weight.dtype
            or not x.is_cpu
            or type(x) is not torch.Tensor
            or rows == 0
            or (rows > self.pass_rows and not self.prompts_too)
            or _takes_torchs_path_only()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))
        ):
            return F.linear(x, weight, bias)
        return _chatglm_cpu_linear(x, self.handle or self.handle_for(layer))


# Which backend a float linear layer (`FloatLinear`) computes with: the first that fits it.
FLOAT_BACKENDS = (ChatGLMCpuFloat, TorchLinear)


class FloatLinear(_ChoosesBackend, nn.Linear):
    """`nn.Linear` (same parameters, same state dict) that computes with one of FLOAT_BACKENDS, chosen when its
    parameters, device or `cpu_kernel` (`set_cpu_kernel`, as for the quantized layers) change."""

    BACKENDS = FLOAT_BACKENDS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpu_kernel = "torch"
        self._backend = None

    def __setattr__(self, name, value):
        if name in ("weight", "bias"):
            self.__dict__["_backend"] = None  # made for the old tensor
        super().__setattr__(name, value)

    def forward(self, x):
        if _is_compiling():
            return super().forward(x)
        backend = self._backend
        if backend is None or backend.key != _parameters_key(self):
            backend = self._choose_backend()
        return backend(self, x)


# ---------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------


def _check_quantizable(name, module, bits):
    """Raise unless `module` is an nn.Linear that can be quantized to `bits`, or already is at `bits`."""
    if isinstance(module, QuantizedLinear):
        if module.bits != bits:
            raise ValueError(f"{name} is already quantized to {module.bits} bits; cannot re-quantize to {bits}")
    elif not isinstance(module, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear to quantize, got {type(module).__name__}")
    elif bits == 4 and module.in_features % 2:
        raise ValueError(
            f"{name}: int4 packs two inputs per byte, so in_features must be even; "
            f"weight shape {tuple(module.weight.shape)}"
        )


def _quantized_replacement(linear, bits, empty_init, device):
    """The QuantizedLinear for `linear`: empty (to be filled from a checkpoint) or its quantization."""
    if empty_init:
        return QuantizedLinear(
            linear.in_features,
            linear.out_features,
            bits,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=device if device is not None else linear.weight.device,
        )
    return QuantizedLinear.from_linear(linear, bits)


def quantize_model(transformer, bits, empty_init=False, device=None):
    """Replace the four projections of every `transformer.encoder.layers[i]` by `QuantizedLinear`.

    Layer by layer, so only one layer's float weights exist beside the quantized ones: with `device`,
    each layer moves there first and is quantized there (`.quantize(4, device="cuda")` streams the
    model onto the GPU). `empty_init=True` allocates empty quantized parameters, to be filled from a
    pre-quantized checkpoint. Layers already quantized to `bits` are left alone. Returns `transformer`.
    """
    _check_bits(bits)
    layers = transformer.encoder.layers
    # Check everything first, so a bad layer leaves the model untouched.
    for index, layer in enumerate(layers):
        for path in QUANTIZED_PROJECTIONS:
            _check_quantizable(f"encoder.layers.{index}.{path}", layer.get_submodule(path), bits)
    for layer in layers:
        if device is not None and not empty_init:
            layer.to(device)
        for path in QUANTIZED_PROJECTIONS:
            parent_path, attribute = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            linear = getattr(parent, attribute)
            if not isinstance(linear, QuantizedLinear):
                # Drops the last reference to the float weight.
                setattr(parent, attribute, _quantized_replacement(linear, bits, empty_init, device))
        if device is not None and empty_init:
            layer.to(device)
    return transformer


def resolve_cpu_kernel(kernel=None):
    """The CPU kernel that `kernel` (one of `CPU_KERNELS`; None: `DEFAULT_CPU_KERNEL`) names on this machine:
    "auto" is "chatglm_cpu" where that package is installed and runs on this CPU, else "torch"."""
    kernel = DEFAULT_CPU_KERNEL if kernel is None else kernel
    if kernel not in CPU_KERNELS:
        raise ValueError(f"cpu_kernel must be one of {', '.join(map(repr, CPU_KERNELS))}; got {kernel!r}")
    if kernel == "auto":
        return "torch" if _chatglm_cpu_or_why_not()[0] is None else "chatglm_cpu"
    return kernel


def set_cpu_kernel(model, kernel=None):
    """Make every `QuantizedLinear`, `FloatLinear` and other module with a `cpu_kernel` in `model` compute on the
    CPU with `resolve_cpu_kernel(kernel)`; returns `model`.

    "onnxruntime" without onnxruntime and onnx installed, or "chatglm_cpu" asked for by name without its
    package or AVX2, warns once and keeps the torch kernels.
    """
    kernel = resolve_cpu_kernel(kernel)
    optional_kernels = {"onnxruntime": _onnxruntime, "chatglm_cpu": _chatglm_cpu}
    if kernel in optional_kernels:
        optional_kernels[kernel]()  # the warning, if any, now rather than at the first forward
    for module in model.modules():
        # The model's own modules that choose a CPU kernel declare `cpu_kernel` too (its attention).
        if hasattr(module, "cpu_kernel") and module.cpu_kernel != kernel:
            module.cpu_kernel = kernel
            if hasattr(module, "_backend"):
                module._backend = None
    return model


def quantize_output_layer(transformer, bits, empty_init=False, device=None):
    """Replace `transformer.output_layer`, the vocabulary projection, by a `QuantizedLinear` (opt-in).

    The release keeps it in floating point. After the layers it is the largest matrix a decode step
    reads (vocabulary x hidden: 533 MB at 16 bits for the 6B model); already at `bits`, it is left alone.
    """
    _check_bits(bits)
    _check_quantizable("output_layer", transformer.output_layer, bits)
    if not isinstance(transformer.output_layer, QuantizedLinear):
        if device is not None and not empty_init:
            transformer.output_layer.to(device)
        transformer.output_layer = _quantized_replacement(transformer.output_layer, bits, empty_init, device)
    return transformer
