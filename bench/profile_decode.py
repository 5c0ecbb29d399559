"""`python -m bench.profile_decode`: where the time of one decode step goes, by torch.profiler.

Loads the cached checkpoint of one precision as the harness does, runs `generate` on a prompt and
profiles decode steps only: a streamer advances the profiler's schedule at every token, so the
prefill and the first decode step (warm-up) stay outside the recorded window. Prints, and writes to
`<out>/profile-<precision>.txt`, the top operators by self CPU time, the same split by input shape
(which tells the four projections apart), and the step's wall time against the time inside ops.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import AutoModel
from transformers.generation.streamers import BaseStreamer

from .checkpoint import cache_root, model_folder
from .kernels import load_quantization
from .model_shapes import REPO_ROOT, released_config
from .system import describe_machine
from .worker import generate_exactly, random_prompt

PRECISION_BITS = {"bf16": 16, "int8": 8, "int4": 4}
# Profiler steps before the recorded window: generate's setup, then the prefill, then one warm-up decode step.
WAIT_STEPS = 2
WARMUP_STEPS = 1


class ProfilerStepper(BaseStreamer):
    """Ends a profiler step at every token generate hands over, and timestamps it."""

    def __init__(self, profiler):
        self.profiler = profiler
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.profiler.step()

    def end(self):
        pass


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.profile_decode", description=__doc__)
    parser.add_argument("--precision", default="int4", choices=tuple(PRECISION_BITS))
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="decode steps recorded")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "bfloat16"),
                        help="dtype the checkpoint loads in (auto: the quantized files' float16)")
    parser.add_argument("--cpu-kernel", default="auto", choices=load_quantization().CPU_KERNELS,
                        help="the quantized layers' CPU kernel (quantize(bits, cpu_kernel=...); default auto: "
                        "chatglm_cpu where it is installed, else torch)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = released_config(quick=args.quick)
    bits = PRECISION_BITS[args.precision]
    folder = model_folder(cache_root(args.cache_dir, args.quick, args.seed), config, args.seed, bits)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else "auto"
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
    cpu_kernel = load_quantization().resolve_cpu_kernel(args.cpu_kernel)
    if bits < 16:
        model = model.quantize(bits, cpu_kernel=cpu_kernel)
    prompt = random_prompt(config["padded_vocab_size"], args.batch, args.prompt_length, 1, "cpu")

    activities = [ProfilerActivity.CPU]
    recorded = WAIT_STEPS + WARMUP_STEPS + args.steps
    with profile(
        activities=activities,
        schedule=schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=args.steps, repeat=1),
        record_shapes=True,
    ) as profiler:
        stepper = ProfilerStepper(profiler)
        # One token more than the steps profiled, so the last recorded step is closed by a put().
        generate_exactly(model, prompt, recorded, stepper)
    # times[0]: prompt; times[1]: first token (end of prefill); recorded steps end at times[3..].
    step_seconds = [later - earlier for earlier, later in zip(stepper.times[2:-1], stepper.times[3:])][: args.steps]
    averages = profiler.key_averages()
    machine = describe_machine("cpu")
    ops_microseconds = sum(event.self_cpu_time_total for event in averages) / args.steps
    wall = statistics.median(step_seconds)
    lines = [
        f"profile of {args.steps} decode steps: {args.precision}, {'quick' if args.quick else 'ChatGLM2-6B'} shapes, "
        f"dtype {args.dtype}, cpu_kernel {cpu_kernel}, batch {args.batch}, prompt {args.prompt_length}, "
        f"{args.threads} threads, torch {torch.__version__}; {machine['cpu']}, ISA {machine['isa']}",
        f"wall time per step: median {wall * 1e3:.1f} ms ({1 / wall * args.batch:.3g} tokens/s); "
        f"self CPU time inside operators: {ops_microseconds / 1e3:.1f} ms per step",
        "",
        "top operators by self CPU time (all recorded steps):",
        averages.table(sort_by="self_cpu_time_total", row_limit=args.rows),
        "",
        "the same, split by input shapes:",
        profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows),
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    variant = "".join(f"-{value}" for value in (args.dtype, cpu_kernel) if value not in ("bfloat16", "torch"))
    path = args.out / f"profile-{args.precision}{variant}{'-quick' if args.quick else ''}.txt"
    path.write_text(text + "\n")
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
