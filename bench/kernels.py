"""`python -m bench.kernels`: the CPU matmul kernels of quantized layers, one layer's matrices at a time.

A decode step multiplies one to a few activation rows by every quantized matrix, so its speed is the
speed of these kernels on weights that come from memory, not from cache. This times each CPU kernel
`QuantizedLinear` can use (`cpu_kernel` "torch" in bfloat16 and float32, "onnxruntime", "chatglm_cpu" in
float16, the released checkpoints' dtype, with each instruction set the CPU runs, when installed) on the
four projection matrices of a 6B layer (shapes from the model built on the meta device), rotated
over enough random copies that they do not fit in the caches, and scales the time to the 28 layers
of a step. Each figure is given as a fraction of the memory roofline: the weight bytes of a step
(with one 2-byte scale per row, as the released format stores them) over the read bandwidth
measured here. Also times `output_layer` (65024 x 4096), which every decode step reads too.
Prints a table and writes `<out>/kernels.json`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .model_shapes import REPO_ROOT, release_tensors, released_config
from .system import describe_machine, read_bandwidth, summary

LAYER_PREFIX = "transformer.encoder.layers.0."
OUTPUT_LAYER = "transformer.output_layer.weight"


def load_quantization():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chatglm_quantization_for_bench_kernels", REPO_ROOT / "quantization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer_shapes(config):
    """(name, (out, in)) of one layer's quantized matrices, from the model itself."""
    return [
        (tensor.name[len(LAYER_PREFIX) : -len(".weight")], tensor.shape)
        for tensor in release_tensors(config)
        if tensor.quantized and tensor.name.startswith(LAYER_PREFIX)
    ]


def random_layer(Q, shape, bits, dtype, generator):
    """A QuantizedLinear of `shape` with random released bytes and scales (no float weight needed)."""
    out_features, in_features = shape
    layer = Q.QuantizedLinear(in_features, out_features, bits, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-128, 128, layer.weight.shape, dtype=torch.int8, generator=generator))
        layer.weight_scale.copy_((torch.rand(out_features, generator=generator) * 1e-3 + 1e-4).to(dtype))
    return layer


def call_layer(layer, x):
    return layer(x)


def time_layers(layers, rows, dtype, repeats, forwards=(call_layer,)):
    """For each of `forwards` (`forward(layer, x)` computes a layer): (wall seconds, CPU seconds of this
    process) per pass over `layers`, one activation per input width. The forwards take turns within
    each repeat, so that a shared machine's drift in bandwidth falls on all of them alike."""
    inputs = {layer.in_features: torch.randn(rows, layer.in_features).to(dtype) for layer in layers}
    timings = [([], []) for _ in forwards]
    with torch.inference_mode():
        for forward in forwards:  # one untimed pass: first-call work, if any is left, and warm allocator
            for layer in layers:
                forward(layer, inputs[layer.in_features])
        for _ in range(repeats):
            for forward, (walls, cpus) in zip(forwards, timings):
                wall, cpu = time.perf_counter(), time.process_time()
                for layer in layers:
                    forward(layer, inputs[layer.in_features])
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
    return timings


def chatglm_cpu_forward(chatglm_cpu, isa):
    """A layer's product by chatglm_cpu's kernels of one instruction set (the model always takes the best)."""
    return lambda layer, x: chatglm_cpu.linear(x, layer.weight, layer.weight_scale, layer.bias, layer.bits, isa=isa)


def measure_kernel(Q, config, bits, kernel, dtype, copies, batches, repeats, isas=(None,)):
    """One result row per instruction set in `isas` (chatglm_cpu; None: the layer's own call)."""
    generator = torch.Generator().manual_seed(bits)
    shapes = layer_shapes(config)
    layers = [random_layer(Q, shape, bits, torch.bfloat16, generator) for _ in range(copies) for _, shape in shapes]
    Q.set_cpu_kernel(torch.nn.ModuleList(layers), kernel)
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():  # first calls: CPU int4 layout conversion, onnxruntime sessions
        for layer in layers:
            layer(torch.zeros(1, layer.in_features, dtype=dtype))
    setup_seconds, setup_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    step_scale = config["num_layers"] / copies
    forwards = [chatglm_cpu_forward(Q._chatglm_cpu(), isa) if isa else call_layer for isa in isas]
    results = [
        {
            "bits": bits,
            "kernel": kernel + (f" ({isa})" if isa else ""),
            "activations": str(dtype).removeprefix("torch."),
            "copies": copies,
            "first_call_seconds_per_step": setup_seconds * step_scale,
            "first_call_cpu_seconds_per_step": setup_cpu_seconds * step_scale,
        }
        for isa in isas
    ]
    for batch in batches:
        for result, (walls, cpus) in zip(results, time_layers(layers, batch, dtype, repeats, forwards)):
            result[f"batch{batch}"] = {
                "step_seconds": summary([wall * step_scale for wall in walls]),
                "step_cpu_seconds": summary([cpu * step_scale for cpu in cpus]),
            }
    del layers
    return results


def measure_output_layer(Q, config, repeats):
    """output_layer at batch 1: float16 as stored, bfloat16, and int8-quantized on each kernel."""
    vocab, hidden = config["padded_vocab_size"], config["hidden_size"]
    generator = torch.Generator().manual_seed(16)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float16).mul_(0.02)
    rows = {}
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        w = weight.to(dtype)
        x = torch.randn(1, hidden).to(dtype)
        F.linear(x, w)
        walls = []
        for _ in range(repeats):
            start = time.perf_counter()
            F.linear(x, w)
            walls.append(time.perf_counter() - start)
        rows[name] = {"bytes": w.nbytes, "seconds": summary(walls)}
        del w
    for kernel in (name for name in Q.CPU_KERNELS if name != "auto"):  # "auto" is one of the others
        layer = Q.QuantizedLinear.from_linear(torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16), 8)
        with torch.no_grad():
            layer.weight.copy_(Q.quantize_weight(weight.to(torch.bfloat16), 8)[0])
        Q.set_cpu_kernel(layer, kernel)
        [(walls, _)] = time_layers([layer], 1, torch.bfloat16, repeats)
        rows[f"int8, {kernel}"] = {"bytes": layer.weight.nbytes + 2 * vocab, "seconds": summary(walls)}
        del layer
    return rows


def step_weight_bytes(config, bits):
    shapes = layer_shapes(config)
    return config["num_layers"] * sum(out * inp * bits // 8 + 2 * out for _, (out, inp) in shapes)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="copies of the layer's matrices rotated over (default 8: 0.8 GB at int4)")
    parser.add_argument("--batches", type=lambda text: [int(v) for v in text.split(",")], default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bits", type=lambda text: [int(v) for v in text.split(",")], default=[4, 8])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--float32", action="store_true", help="also time float32 activations (the exact path; slow)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    Q = load_quantization()
    config = released_config()
    bandwidth = read_bandwidth(1 << 30)["bytes_per_second"]["median"]
    machine = describe_machine("cpu")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} threads, {machine['cpu']}, ISA {machine['isa']}", file=sys.stderr)
    kernels = [("torch", torch.bfloat16, (None,))]
    if args.float32:
        kernels.append(("torch", torch.float32, (None,)))
    onnxruntime = Q._onnxruntime() is not None
    if onnxruntime:
        kernels.append(("onnxruntime", torch.bfloat16, (None,)))
    chatglm_cpu = Q._chatglm_cpu() is not None
    if chatglm_cpu:  # each instruction set this CPU runs (AVX512-VNNI and AVX2 on an AVX-512 machine)
        kernels.append(("chatglm_cpu", torch.float16, Q._chatglm_cpu().isas()))
    rows = []
    for bits in args.bits:
        roofline = step_weight_bytes(config, bits) / bandwidth
        for kernel, dtype, isas in kernels:
            print(f"int{bits} {kernel} {dtype}", file=sys.stderr, flush=True)
            for row in measure_kernel(Q, config, bits, kernel, dtype, args.copies, args.batches, args.repeats, isas):
                row["roofline_step_seconds"] = roofline
                rows.append(row)
    output_layer = measure_output_layer(Q, config, args.repeats)
    results = {
        "machine": machine,
        "threads": args.threads,
        "bandwidth_bytes_per_second": bandwidth,
        "onnxruntime": onnxruntime,
        "chatglm_cpu": chatglm_cpu,
        "kernels": rows,
        "output_layer_batch1": output_layer,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{machine['cpu']}, ISA {machine['isa']}, {args.threads} threads. 28-layer step, quantized matrices only"
          f" (median of {args.repeats}; CPU time of this process in brackets); roofline = weight bytes / {bandwidth / 1e9:.1f} GB/s")
    header = "| weights | kernel | activations | first call (s/step) |" + "".join(
        f" batch {b} (ms/step) | batch {b} % of roofline |" for b in args.batches
    )
    print(header)
    print("|" + "---|" * (4 + 2 * len(args.batches)))
    for row in rows:
        cells = [
            f"int{row['bits']}",
            row["kernel"],
            row["activations"],
            f"{row['first_call_seconds_per_step']:.1f} [{row['first_call_cpu_seconds_per_step']:.1f}]",
        ]
        for batch in args.batches:
            timing = row[f"batch{batch}"]
            median = timing["step_seconds"]["median"]
            cells.append(f"{median * 1e3:.0f} [{timing['step_cpu_seconds']['median'] * 1e3:.0f}]")
            cells.append(f"{row['roofline_step_seconds'] / median:.0%}")
        print("| " + " | ".join(cells) + " |")
    print("\noutput_layer, batch 1:")
    print("| weights | ms | GB/s | % of roofline |")
    print("|---|---|---|---|")
    for name, row in output_layer.items():
        seconds = row["seconds"]["median"]
        print(f"| {name} | {seconds * 1e3:.1f} | {row['bytes'] / seconds / 1e9:.1f} | {row['bytes'] / bandwidth / seconds:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
