"""What every worker does the same way, ours (`bench.worker`) and a peer's (`bench.llama_cpp_peer`): the first
generate's lengths, the pause for a bandwidth reading, and the split of the first generate's time. No torch here.
"""

import resource
import sys

from .system import current_rss_bytes, peak_rss_bytes, rss_split_bytes, storage_read_bytes

WARMUP_PROMPT_LENGTH = 8
WARMUP_NEW_TOKENS = 2
# Random prompts avoid the special ids at the bottom of the vocabulary (pad, bos, eos).
FIRST_ORDINARY_TOKEN = 3


# With --bandwidth-pauses the worker prints this line before each run and after the last, then waits for
# a line on stdin: `python -m bench` reads the memory bandwidth meanwhile, from its own process (an array
# here would count in this process's memory figures), so the roofline uses readings taken between runs.
BANDWIDTH_PAUSE = "bench.worker: read the bandwidth now"


def pause_for_bandwidth(args):
    if args.bandwidth_pauses:
        print(BANDWIDTH_PAUSE, flush=True)
        sys.stdin.readline()


def usage_now():
    """What `first_generate_split` compares: this process's resource usage and its bytes read from storage."""
    return resource.getrusage(resource.RUSAGE_SELF), storage_read_bytes()


def first_generate_split(before, after, first_token_seconds):
    """What the first generate spent besides computing (`before`, `after`: `usage_now()`): page faults served from
    the disk (major) and from the page cache (minor), the bytes read from storage, and the process's CPU time in
    the kernel (system: faults, mapping pages) against its own (user)."""
    (usage_before, read_before), (usage_after, read_after) = before, after
    return {
        "first_token_seconds": first_token_seconds,
        "major_faults": usage_after.ru_majflt - usage_before.ru_majflt,
        "minor_faults": usage_after.ru_minflt - usage_before.ru_minflt,
        "storage_read_bytes": read_after - read_before if None not in (read_before, read_after) else None,
        "user_seconds": usage_after.ru_utime - usage_before.ru_utime,
        "system_seconds": usage_after.ru_stime - usage_before.ru_stime,
    }


def memory_after_load(anonymous):
    """The memory figures once loaded (`anonymous`: the worker's AnonymousPeakSampler)."""
    return {
        "rss_after_load_bytes": current_rss_bytes(),
        "rss_after_load_split_bytes": rss_split_bytes(),
        "peak_rss_load_bytes": peak_rss_bytes(),
        "peak_anonymous_load_bytes": anonymous.take_peak(),
    }


def memory_after_runs(anonymous, peak_reset):
    """The memory figures after the runs: the steady state (layers may change their weight layout at their first
    forward, as CPU int4 on torch's kernels does) and the runs' peaks (VmHWM covers the runs alone when it was reset
    after loading: `peak_reset`)."""
    return {
        "rss_after_runs_bytes": current_rss_bytes(),
        "rss_after_runs_split_bytes": rss_split_bytes(),
        "peak_rss_run_bytes": peak_rss_bytes() if peak_reset else None,
        "peak_anonymous_run_bytes": anonymous.take_peak(),
    }


def finish(result, anonymous, others):
    """Stop the sampler; the other processes' CPU, and the peaks over the whole process, into `result`."""
    anonymous.stop()
    result["other_processes_cores"] = others.cores()
    result["peak_rss_bytes"] = max(value for value in (result["peak_rss_load_bytes"], peak_rss_bytes()) if value)
    anonymous_peaks = [result.get(key) for key in ("peak_anonymous_load_bytes", "peak_anonymous_run_bytes")]
    result["peak_anonymous_bytes"] = max((value for value in anonymous_peaks if value), default=None)
    return result
