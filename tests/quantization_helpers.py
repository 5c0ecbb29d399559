"""What the quantization tests share (test_quantization.py, test_quantized_model.py, test_cpu_kernels.py).

`Q` is quantization.py loaded from its file, as transformers loads remote code.
"""

import ctypes
import importlib.util
import mmap
from pathlib import Path

QUANTIZATION_PY = Path(__file__).resolve().parent.parent / "quantization.py"


def load_quantization(name="chatglm_quantization_under_test"):
    spec = importlib.util.spec_from_file_location(name, QUANTIZATION_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Q = load_quantization()


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
