"""The Triton kernel of quantization.py compiled ahead of time for real GPUs, with no GPU here.

Triton's wheel ships NVIDIA's ptxas and cuobjdump, so `triton.compile` builds the cubin a GPU of a
given compute capability would load, and `cuobjdump -res-usage` reads its registers, stack (spill)
bytes and shared memory. Every tile shape of `TRITON_TILES` is compiled for each target, both
weight widths and both float types, as the 6B model's calls specialise it (16-byte aligned
pointers, N, K and strides multiples of 16, M any).

    python -m bench.triton_targets            # table; JSON to bench/results/triton-targets.json

What it cannot show is speed: that needs the GPU (bench/gpu_check.sh).
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# Compute capability -> (example GPUs, the most shared memory one block may use, bytes).
TARGETS = {
    (7, 5): ("T4, RTX 20xx", 64 * 1024),
    (8, 0): ("A100", 163 * 1024),
    (8, 6): ("A10, RTX 30xx", 99 * 1024),
    (8, 9): ("L4, RTX 40xx", 99 * 1024),
    (9, 0): ("H100", 227 * 1024),
}
FLOAT_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# The lowest capability whose tensor cores take each float type's dots (as quantization._triton_fits).
MINIMUM_CAPABILITY = {torch.float16: (7, 5), torch.bfloat16: (8, 0)}
PHASE_ROWS = {"decode": 1, "prefill": 128}
# Kernel arguments the 6B model's calls give 16-byte alignment / multiples of 16 (all but M).
ALIGNED_ARGUMENTS = ("x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn", "stride_om")


def load_quantization():
    spec = importlib.util.spec_from_file_location("chatglm_quantization_for_targets", ROOT / "quantization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases():
    """(capability, dtype, bits, phase) of every compile this module makes."""
    return [
        (capability, dtype, bits, phase)
        for capability in TARGETS
        for dtype in FLOAT_TYPES
        if capability >= MINIMUM_CAPABILITY[dtype]
        for bits in (4, 8)
        for phase in PHASE_ROWS
    ]


def _tool(name):
    from triton.backends.nvidia import compiler

    return os.path.join(os.path.dirname(compiler.__file__), "bin", name)


def compile_kernel(Q, capability, dtype, bits, phase):
    """Compile the kernel for one target; returns its resources as cuobjdump reports them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = Q._dequantize_matmul_kernel
    block_m, block_n, block_k, num_warps, num_stages = Q.triton_tiles(PHASE_ROWS[phase], capability)
    float_type = "*" + FLOAT_TYPES[dtype]
    signature = {name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_wn", "stride_om")}
    signature.update({name: float_type for name in ("x_ptr", "scale_ptr", "bias_ptr", "out_ptr")}, w_ptr="*i8")
    constants = {"BITS": bits, "HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    signature.update({name: "constexpr" for name in constants})
    signature = {name: signature[name] for name in kernel.arg_names}
    attributes = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in ALIGNED_ARGUMENTS}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes),
        target=GPUTarget("cuda", capability[0] * 10 + capability[1], 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        report = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True)
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report.stdout))
    if set(usage) != {"REG", "STACK", "LOCAL"}:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK/LOCAL for sm_{capability[0]}{capability[1]}: {report.stdout!r}")
    return {
        "capability": f"{capability[0]}.{capability[1]}",
        "dtype": FLOAT_TYPES[dtype],
        "bits": bits,
        "phase": phase,
        "tiles": [block_m, block_n, block_k, num_warps, num_stages],
        "registers": int(usage["REG"]),
        "stack_bytes": int(usage["STACK"]),
        "local_bytes": int(usage["LOCAL"]),
        "shared_bytes": compiled.metadata.shared,
        "shared_limit": TARGETS[capability][1],
        "cubin_bytes": len(compiled.asm["cubin"]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "triton-targets.json")
    args = parser.parse_args(argv)
    import triton

    Q = load_quantization()
    rows = [compile_kernel(Q, *case) for case in cases()]
    print(f"Triton {triton.__version__}; registers per thread, stack = spilled bytes, shared memory per block")
    print(f"{'target':>6} {'GPUs':>14} {'dtype':>5} {'bits':>4} {'phase':>8} {'tiles':>22} {'regs':>4} {'stack':>5} {'shared':>13} {'cubin':>7}")
    for row in rows:
        gpus = TARGETS[tuple(int(part) for part in row["capability"].split("."))][0]
        shared = f"{row['shared_bytes'] // 1024}/{row['shared_limit'] // 1024} KiB"
        print(
            f"{'sm_' + row['capability'].replace('.', ''):>6} {gpus:>14} {row['dtype']:>5} {row['bits']:>4} {row['phase']:>8} "
            f"{str(tuple(row['tiles'])):>22} {row['registers']:>4} {row['stack_bytes']:>5} {shared:>13} {row['cubin_bytes']:>7}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"triton": triton.__version__, "kernels": rows}, indent=1) + "\n")
    temporary.replace(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
