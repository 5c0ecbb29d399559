"""What the quantization tests share (test_quantization.py, test_quantized_model.py, test_cpu_kernels.py).

`Q` is quantization.py loaded from its file, as transformers loads remote code. The released
layout is written out again here with plain integer arithmetic, independently of the module: a
test whose reference came from the module's own unpacking would pass however the module read its
bytes. Released layout: one int8 per weight for 8 bits; for 4 bits byte j of a row holds weight
2j in its high nibble and weight 2j+1 in its low nibble, each a signed (two's complement) nibble;
a weight is its integer times its row's scale.
"""

import ctypes
import importlib.util
import mmap
from pathlib import Path

import torch

QUANTIZATION_PY = Path(__file__).resolve().parent.parent / "quantization.py"


def load_quantization(name="chatglm_quantization_under_test"):
    spec = importlib.util.spec_from_file_location(name, QUANTIZATION_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Q = load_quantization()


def released_bytes(q, bits):
    """The released weight (int8 [out, in] or [out, in/2]) of the integers `q` [out, in]."""
    if bits == 8:
        return q.to(torch.int8)
    q = q.to(torch.int32)
    high, low = q[:, 0::2] & 0xF, q[:, 1::2] & 0xF
    return ((high << 4) | low).to(torch.uint8).view(torch.int8)


def released_integers(weight, bits):
    """The integers (int32 [out, in]) of the released weight `weight`."""
    if bits == 8:
        return weight.to(torch.int32)
    unsigned = weight.view(torch.uint8).to(torch.int32)
    nibbles = torch.stack((unsigned >> 4, unsigned & 0xF), dim=-1).flatten(-2)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def dequantized_weight(weight, scale, bits):
    """The float weight [out, in] of a released weight and its row scales, in the scale's dtype: each
    integer times its scale, exact in float64, rounded once."""
    return (released_integers(weight, bits).double() * scale.double()[:, None]).to(scale.dtype)


def chatglm_cpu_runs():
    """Whether the optional chatglm_cpu package is installed and runs on this CPU (AVX2)."""
    if importlib.util.find_spec("chatglm_cpu") is None:
        return False
    import chatglm_cpu

    return chatglm_cpu.available()


def page_faults_reading(tensors):
    """The page faults this thread takes reading one byte of every page under `tensors` (Linux)."""
    import resource  # Unix only

    before = resource.getrusage(resource.RUSAGE_THREAD)
    for tensor in tensors:
        start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
        for address in range(start, tensor.data_ptr() + tensor.numel() * tensor.element_size(), mmap.PAGESIZE):
            ctypes.c_char.from_address(address).value
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return after.ru_minflt - before.ru_minflt + after.ru_majflt - before.ru_majflt
