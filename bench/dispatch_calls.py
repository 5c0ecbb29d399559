"""`python -m bench.dispatch_calls`: Python function calls a decode step makes, by file (cProfile).

What the Python around the kernels costs does not show in the profiler's operator tables: this counts the
function calls of one decode step (greedy `generate`, the prefill and the first step left out) on the
`--quick` shapes, whose two layers make the same calls per layer as the 6B model's 28, and splits them
by the package's files. Run it on two checkouts to compare their per-call dispatch; writes JSON.
"""

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path

import torch
from transformers import AutoModel

from .checkpoint import cache_root, model_folder
from .model_shapes import REPO_ROOT, released_config
from .system import describe_machine
from .worker import random_prompt

PACKAGE_FILES = ("modeling_chatglm.py", "quantization.py", "chatglm_cpu/__init__.py")


def calls_per_step(model, steps):
    """{file or "other": function calls} per decode step, averaged over `steps` steps after a warm-up."""
    prompt = random_prompt(model.config.padded_vocab_size, 1, 8, 0, "cpu")
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, past_key_values=cache, use_cache=True)  # warm-up: handles and layouts made
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        profiler = cProfile.Profile()
        for _ in range(steps):
            profiler.enable()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            profiler.disable()
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    counts = {}
    for (filename, _, _), (_, total_calls, *_rest) in pstats.Stats(profiler).stats.items():
        key = next((name for name in PACKAGE_FILES if filename.endswith(name)), "other")
        counts[key] = counts.get(key, 0) + total_calls
    counts = {key: round(value / steps) for key, value in sorted(counts.items())}
    counts["total"] = sum(counts.values())
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="bf16,int8,int4")
    parser.add_argument("--cpu-kernels", default="torch,chatglm_cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=Path("bench/results/dispatch-calls.json"))
    args = parser.parse_args(argv)
    config = released_config(quick=True)
    root = cache_root(args.cache_dir, True, 0)
    rows = []
    print(f"{'precision':<10}{'cpu kernel':<13}" + "".join(f"{name:>26}" for name in (*PACKAGE_FILES, "other", "total")))
    for precision in args.precisions.split(","):
        bits = {"bf16": 16, "int8": 8, "int4": 4}[precision]
        folder = model_folder(root, config, 0, bits)
        for kernel in args.cpu_kernels.split(","):
            model = AutoModel.from_pretrained(
                folder, trust_remote_code=True, dtype=torch.bfloat16, quantization_cpu_kernel=kernel
            ).eval()
            counts = calls_per_step(model, args.steps)
            rows.append({"precision": precision, "cpu_kernel": kernel, "calls_per_step": counts})
            print(f"{precision:<10}{kernel:<13}" + "".join(f"{counts.get(name, 0):>26}" for name in (*PACKAGE_FILES, "other", "total")))
    result = {"machine": describe_machine("cpu"), "layers": config["num_layers"], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
