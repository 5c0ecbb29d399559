"""What the harness reads from the machine: resident memory, read bandwidth, a description of the host.

torch is imported only where it is used: a peer's worker (`bench.llama_cpp_peer`) reads memory with this module
from a Python that may have no torch.
"""

import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field):
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{PROC_STATUS} has no {field} line")


def current_rss_bytes():
    """Resident set size now (VmRSS), or None where /proc is missing (non-Linux)."""
    return _status_bytes("VmRSS") if PROC_STATUS.exists() else None


def rss_split_bytes():
    """{"anonymous": ..., "file": ...}: RSS split into process memory and mapped file pages.

    Weights that transformers leaves memory-mapped from the checkpoint count as file pages: the
    kernel can drop and re-read them, so they press on memory less than anonymous pages do.
    """
    if not PROC_STATUS.exists():
        return None
    return {"anonymous": _status_bytes("RssAnon"), "file": _status_bytes("RssFile")}


def storage_read_bytes():
    """Bytes this process has caused to be read from storage (/proc/self/io read_bytes: page cache misses,
    memory-mapped checkpoint pages included), or None where /proc is missing."""
    io = Path("/proc/self/io")
    if not io.exists():
        return None
    for line in io.read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return None


def peak_rss_bytes():
    """Highest resident set size since start or the last `reset_peak_rss` (VmHWM); getrusage elsewhere."""
    if PROC_STATUS.exists():
        return _status_bytes("VmHWM")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss():
    """Restart the VmHWM high-water mark at the current RSS; False where the kernel does not allow it."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class AnonymousPeakSampler:
    """Highest anonymous resident memory (RssAnon) seen, sampled every `interval` seconds in a thread.

    VmHWM also counts the checkpoint pages a memory-mapped load touches, which the kernel can drop
    and re-read; this is the memory that cannot be given back. None where /proc is missing.
    """

    def __init__(self, interval=0.02):
        self.interval = interval
        self.peak = None
        self._lock = threading.Lock()  # the thread's read-modify-write must not straddle a reset
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        value = _status_bytes("RssAnon")
        with self._lock:
            self.peak = value if self.peak is None else max(self.peak, value)

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self):
        if PROC_STATUS.exists():
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def take_peak(self):
        """The peak since `start` or the last call, and start over from the current value."""
        if self._thread is None:
            return None
        self._sample()
        with self._lock:
            peak, self.peak = self.peak, _status_bytes("RssAnon")
        return peak

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class OtherProcessesMeter:
    """CPU time that other processes (and the hypervisor, as steal) took while this one measured.

    Reported in cores: 0 means the machine was ours alone, 1 means one core was busy elsewhere all
    the time. Needs Linux's /proc/stat; `cores()` returns None elsewhere.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        stat = Path("/proc/stat")
        if not stat.exists():
            return None
        fields = [int(value) for value in stat.read_text().splitlines()[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        machine_busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.perf_counter(), machine_busy, own.user + own.system

    def cores(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, others / wall)


def read_bandwidth(num_bytes=1 << 30, repetitions=10):
    """Memory read bandwidth in bytes/s: `torch.sum` over a float32 array far larger than the caches.

    A reduction reads every byte once and writes nothing, which is what a memory-bound decode does
    with the weights; it runs on the threads torch is set to, like the model.
    """
    import torch

    array = torch.ones(num_bytes // 4, dtype=torch.float32)
    array.sum()  # first touch: page faults, not bandwidth
    rates = []
    for _ in range(repetitions):
        start = time.perf_counter()
        array.sum()
        rates.append(num_bytes / (time.perf_counter() - start))
    return {
        "method": f"torch.sum over {num_bytes / 2**30:.2f} GiB float32, {torch.get_num_threads()} threads",
        "bytes_per_second": summary(rates),
    }


def summary(values):
    """Median, min, max and the runs themselves: how every measurement is reported."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def _cpu_model():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# The vector extensions that decide which kernels run fast: bfloat16 GEMMs need AVX-512 (or AMX),
# int8 dot products are faster with VNNI. Reported beside every figure.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_isa():
    """e.g. "AVX2 (avx2)" or "AVX512 (avx2, avx512f, avx512_vnni)": torch's kernel level, then the CPU's flags."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    present = [flag for flag in _ISA_FLAGS if flag in flags]
    import torch

    return f"{torch.backends.cpu.get_cpu_capability()} ({', '.join(present) or 'no flags read'})"


def _total_memory_bytes():
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _git_revision():
    """The commit measured, with '+dirty' when the working tree differs from it; None outside git."""
    from .model_shapes import REPO_ROOT

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def describe_machine(device):
    import torch
    import transformers

    description = {
        "cpu": _cpu_model(),
        "isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        description["gpu"] = properties.name
        description["gpu_memory_bytes"] = properties.total_memory
    return description
