"""`python -m bench`: measure load time, memory, prefill and decode speed of each precision.

Writes a random-weight checkpoint of the released shapes and layout under the cache folder (once),
measures this machine's read bandwidth, runs one worker process per configuration (so each one's
memory is its own), and writes results.json, results.md and results.png to the output folder.
`--quick` does the same on tiny shapes in seconds: a smoke test of the harness, not a measurement.
"""

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

import torch

from .checkpoint import cache_root, model_folder
from .kernels import load_quantization
from .model_shapes import REPO_ROOT, decode_roofline, released_config
from .report import check_readme, with_round, write_reports
from .system import describe_machine, read_bandwidth, summary
from .protocol import BANDWIDTH_PAUSE

PRECISIONS = {"bf16": 16, "int8": 8, "int4": 4}
PEERS = ("llama.cpp",)
FULL_DEFAULTS = {"runs": 3, "prefill_lengths": [128, 512], "batches": [1, 4], "new_tokens": 64, "bandwidth_bytes": 1 << 30}
QUICK_DEFAULTS = {"runs": 1, "prefill_lengths": [16, 32], "batches": [1, 4], "new_tokens": 8, "bandwidth_bytes": 64 << 20}
WORKER_TAIL_LINES = 20
# Activations and unquantized weights of the float model and the .quantize() path: float16 matmuls
# are slow on CPUs, and every GPU with bfloat16 (Ampere on) runs it fast.
FLOAT_DTYPE = "bfloat16"
# Quantized files are measured as stored ("auto": the checkpoint's float16, used where it was loaded,
# the smallest footprint; the CPU int8/int4 kernels compute in bfloat16 either way) and in bfloat16
# (the embedding and output layer converted at load: faster on CPUs, about 1 GB more resident).
QUANTIZED_FILE_DTYPES = {"auto": "", "bfloat16": ", bf16"}


def integer_list(text):
    return [int(value) for value in text.split(",")]


def choice_list(*choices):
    """An argparse type: comma-separated values, each one of `choices`."""

    def parse(text):
        values = [value.strip() for value in text.split(",") if value.strip()]
        unknown = [value for value in values if value not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list from {', '.join(choices)}; got {text!r}")
        return values

    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one run each: checks the harness, not speed")
    parser.add_argument("--precisions", default="bf16,int8,int4", help="comma-separated, from bf16, int8, int4 (default: all)")
    parser.add_argument(
        "--no-quantize-path",
        action="store_true",
        help="skip loading the fp16 shards and calling .quantize(bits) (measured for load time and memory only)",
    )
    parser.add_argument(
        "--output-layer-bits",
        type=int,
        choices=(4, 8),
        help="also measure each int8/int4 file with output_layer quantized to these bits (opt-in, not the release)",
    )
    parser.add_argument(
        "--cpu-kernels",
        type=choice_list(*load_quantization().CPU_KERNELS),
        default=["auto"],
        help="comma-separated CPU kernels, one set of rows each, chosen at load "
        "(from_pretrained(..., quantization_cpu_kernel=...)); int8/int4 files: onnxruntime and chatglm_cpu "
        "quantize activations to int8; the bf16 model: chatglm_cpu or torch (onnxruntime is for quantized "
        "layers only); default auto: what a load gives, chatglm_cpu where it is installed, else torch)",
    )
    parser.add_argument(
        "--file-dtypes",
        type=choice_list(*QUANTIZED_FILE_DTYPES),
        default=list(QUANTIZED_FILE_DTYPES),
        help="comma-separated dtypes the int8/int4 files load in (default auto,bfloat16; auto keeps their float16)",
    )
    parser.add_argument(
        "--peer",
        choices=PEERS,
        help="also time another engine the same way, one row per --peer-gguf right after ours of its precision, and "
        "print ours / theirs (llama.cpp: an installed llama-cpp-python; nothing is built or downloaded)",
    )
    parser.add_argument(
        "--peer-gguf",
        action="append",
        default=[],
        metavar="PRECISION=FILE",
        help="with --peer llama.cpp: a GGUF to time and the precision of ours it is held against, e.g. int4=q4_0.gguf "
        "(repeatable; bench/README.md says how one was made from the bench's checkpoint)",
    )
    parser.add_argument("--peer-python", default=sys.executable, help="the Python that runs the peer (default: this one)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every configuration this many times, in turns (ours, the peer's, ours, ...): on a shared host whose "
        "bandwidth moves within minutes, ours / the peer's is then taken round by round, and its median printed",
    )
    parser.add_argument("--runs", type=int, help="repetitions of each speed measurement (default 3; --quick 1)")
    parser.add_argument("--prefill-lengths", type=integer_list, help="prompt lengths; decode follows the first (default 128,512)")
    parser.add_argument("--batches", type=integer_list, help="decode batch sizes (default 1,4)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per decode run (default 64)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's, %(default)s here)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "bench" / "cache", help="where checkpoints are written and reused")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results; --quick: <cache-dir>/quick-results)")
    parser.add_argument(
        "--readme",
        type=Path,
        action="append",
        default=[],
        help="a Markdown file whose '<!-- bench-results:start/end -->' section gets the table and chart (repeatable)",
    )
    args = parser.parse_args(argv)

    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
    unknown = [name for name in args.precisions if name not in PRECISIONS]
    if unknown or not args.precisions:
        parser.error(f"--precisions takes names from {', '.join(PRECISIONS)}; got {', '.join(unknown) or 'none'}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.out is None:
        args.out = args.cache_dir / "quick-results" if args.quick else REPO_ROOT / "bench" / "results"
    if min(args.prefill_lengths + args.batches + [args.runs, args.new_tokens, args.threads]) < 1:
        parser.error("--runs, --prefill-lengths, --batches, --new-tokens and --threads must be positive")
    args.peer_ggufs = []
    for entry in args.peer_gguf:
        precision, _, path = entry.partition("=")
        if precision not in PRECISIONS or not path:
            parser.error(f"--peer-gguf takes PRECISION=FILE with a precision from {', '.join(PRECISIONS)}; got {entry!r}")
        if not Path(path).is_file():
            parser.error(f"--peer-gguf {entry}: {path} is not a file")
        args.peer_ggufs.append((precision, Path(path).resolve()))
    if bool(args.peer) != bool(args.peer_ggufs):
        parser.error("--peer and --peer-gguf go together: --peer llama.cpp --peer-gguf int4=FILE.gguf")
    if args.rounds < 1:
        parser.error(f"--rounds takes a count of at least 1; got {args.rounds}")
    for readme in args.readme:
        try:
            check_readme(readme)
        except (OSError, ValueError) as error:
            parser.error(f"--readme: {error}")
    return args


def kernel_name(quantization, cpu_kernel):
    """The CPU kernel a row ran, as its load path names it: "auto" resolves here as it will in the worker."""
    return quantization.resolve_cpu_kernel(cpu_kernel) + (" (default)" if cpu_kernel == "auto" else "")


def plan_configurations(args, config):
    """What to measure: (label, precision, bits, load path, model folder, dtype, worker flags); writes missing checkpoints."""
    root = cache_root(args.cache_dir, args.quick, args.seed)
    quantization = load_quantization()
    configurations = []
    for precision in args.precisions:
        plan_precision(args, config, root, quantization, precision, configurations)
        configurations += peer_configurations(args, precision)
    for precision in dict.fromkeys(precision for precision, _ in args.peer_ggufs if precision not in args.precisions):
        configurations += peer_configurations(args, precision)
    return configurations


def peer_configurations(args, precision):
    """The peer's rows held against ours at `precision`, one per GGUF given for it."""
    return [
        {
            "label": f"{precision}, {args.peer} {path.stem}",
            "precision": precision,
            "bits": PRECISIONS[precision],
            "load_path": f"{args.peer}: {path.name}",
            "peer": args.peer,
            "gguf": path,
        }
        for gguf_precision, path in args.peer_ggufs
        if gguf_precision == precision
    ]


def plan_precision(args, config, root, quantization, precision, configurations):
    """Our rows of one precision, appended to `configurations`."""
    bits = PRECISIONS[precision]
    configuration = {
        "label": precision,
        "precision": precision,
        "bits": bits,
        "folder": model_folder(root, config, args.seed, bits),
        "dtype": "auto",
    }
    if bits == 16:
        # A float model's matrices run on chatglm_cpu or torch (onnxruntime takes quantized layers only);
        # on CUDA, or with no such kernel named, one row as loaded.
        float_kernels = [kernel for kernel in args.cpu_kernels if kernel != "onnxruntime"] if args.device == "cpu" else []
        for cpu_kernel in float_kernels:
            configurations.append(dict(
                configuration,
                label=precision + ("" if cpu_kernel == "auto" else f", {cpu_kernel}"),
                load_path=f"fp16 shards + cpu_kernel={kernel_name(quantization, cpu_kernel)}",
                dtype=FLOAT_DTYPE,
                flags=["--cpu-kernel", cpu_kernel],
            ))
        if not float_kernels:
            configurations.append(dict(configuration, load_path="fp16 shards", dtype=FLOAT_DTYPE, flags=[]))
        return
    long_conversation = ["--long-conversation"] if bits == 4 and args.device == "cuda" else []
    for cpu_kernel in args.cpu_kernels:
        for dtype in args.file_dtypes:
            configurations.append(dict(
                configuration,
                label=precision + QUANTIZED_FILE_DTYPES[dtype] + ("" if cpu_kernel == "auto" else f", {cpu_kernel}"),
                load_path=f"int{bits} file + cpu_kernel={kernel_name(quantization, cpu_kernel)}",
                dtype=dtype,
                flags=long_conversation + ["--cpu-kernel", cpu_kernel],
            ))
    if args.output_layer_bits:
        configurations.append(dict(
            configuration,
            label=f"{precision}, int{args.output_layer_bits} output_layer",
            load_path=f"int{bits} file + quantize(output_layer_bits={args.output_layer_bits})",
            output_layer_bits=args.output_layer_bits,
            flags=long_conversation + ["--output-layer-bits", str(args.output_layer_bits)],
        ))
    if not args.no_quantize_path:
        configurations.append(dict(
            configuration,
            label=f"{precision} via quantize",
            load_path=f"fp16 shards + quantize({bits})",
            folder=model_folder(root, config, args.seed, 16),
            dtype=FLOAT_DTYPE,
            flags=["--quantize-bits", str(bits), "--load-only"],
        ))


def run_worker(configuration, args):
    """One configuration in its own process; its output is echoed, its JSON result returned with the
    read bandwidth measured at each of its pauses, before each run and after the last (`bandwidth_pauses`)."""
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "result.json"
        if configuration.get("peer"):
            command = [args.peer_python, "-m", "bench.llama_cpp_peer", "--gguf", str(configuration["gguf"])]
        else:
            command = [
                sys.executable, "-m", "bench.worker",
                "--folder", str(configuration["folder"]),
                "--dtype", configuration["dtype"],
                "--device", args.device,
            ] + configuration["flags"]
        command += [
            "--label", configuration["label"],
            "--threads", str(args.threads),
            "--prefill-lengths", ",".join(map(str, args.prefill_lengths)),
            "--batches", ",".join(map(str, args.batches)),
            "--new-tokens", str(args.new_tokens),
            "--runs", str(args.runs),
            "--output", str(output),
            "--bandwidth-pauses",
        ]
        # No network: the model folder is local, and nothing may be fetched while measuring.
        environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        tail = deque(maxlen=WORKER_TAIL_LINES)
        pauses = []
        with subprocess.Popen(
            command, cwd=REPO_ROOT, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as worker:
            for line in worker.stdout:
                if line.rstrip("\n") == BANDWIDTH_PAUSE:
                    pauses.append(read_bandwidth(args.bandwidth_bytes)["bytes_per_second"]["runs"])
                    gc.collect()
                    worker.stdin.write("\n")
                    worker.stdin.flush()
                    continue
                sys.stderr.write(line)
                tail.append(line.rstrip())
        if worker.returncode != 0:
            last = next((line for line in reversed(tail) if line.strip()), "no output")
            return {"error": f"worker exited with code {worker.returncode}: {last}"}
        return dict(json.loads(output.read_text()), bandwidth_pauses=pauses)


def add_rooflines(row, config, args, bandwidth, pauses):
    """Each batch's roofline at the row's median bandwidth, and each run's fraction of the roofline at the
    bandwidth read in the pauses just before and just after that run (`pauses`: one list of readings per pause)."""
    if not row.get("decode"):
        return
    row["roofline"] = {}
    for batch in args.batches:
        roofline = decode_roofline(
            config, row["bits"], bandwidth, args.prefill_lengths[0], args.new_tokens, batch, row["output_layer_bits"],
            weight_bytes=(row.get("peer") or {}).get("weight_bytes_but_embedding"),
        )
        speeds = row["decode"][f"batch{batch}"]["tokens_per_second"]
        roofline["fraction"] = speeds["median"] / roofline["tokens_per_second"]
        if len(pauses) == len(speeds["runs"]) + 1:
            # The roofline is proportional to the bandwidth: tokens/s = batch * bandwidth / bytes per step.
            around = [statistics.median(before + after) for before, after in zip(pauses, pauses[1:])]
            roofline["fraction_per_run"] = summary(
                [speed * roofline["bytes_per_step"] / (batch * rate) for speed, rate in zip(speeds["runs"], around)]
            )
        row["roofline"][f"batch{batch}"] = roofline


def _median_speed(row, section, key):
    entry = (row.get(section) or {}).get(key)
    return entry["tokens_per_second"]["median"] if entry else None


def _ratio(ours, theirs):
    return ours / theirs if ours is not None and theirs else None


def peer_ratios(rows, args):
    """Ours / the peer's for each peer row, against our first row of its precision (and round) that ran (the file as
    stored comes first): speeds above 1 are ours faster; times and memory below 1 are ours smaller. Our resident memory
    after the runs is held against the peer's peak (llama.cpp's repacked copy is gone by then only if it freed it)."""
    ratios = []
    for row in rows:
        if not row.get("peer_of") or row.get("error"):
            continue
        ours = next((other for other in rows if other["precision"] == row["precision"] and not other.get("peer_of")
                     and other.get("round") == row.get("round") and not other.get("error") and other.get("decode")), None)
        if ours is None:
            continue
        speeds = {}
        for section, keys in (("decode", [f"batch{batch}" for batch in args.batches]), ("prefill", list(map(str, args.prefill_lengths)))):
            for key in keys:
                speeds[f"{section} {key}"] = _ratio(_median_speed(ours, section, key), _median_speed(row, section, key))
        ratios.append({
            "ours": ours["label"],
            "peer": row["label"],
            **({"round": row["round"]} if "round" in row else {}),
            **speeds,
            "first generate": _ratio(ours.get("first_generate_seconds"), row.get("first_generate_seconds")),
            "resident after runs / peer peak": _ratio(ours.get("rss_after_runs_bytes"), row.get("peak_rss_bytes")),
            "peak anonymous": _ratio(ours.get("peak_anonymous_bytes"), row.get("peak_anonymous_bytes")),
        })
    return ratios


def ratios_over_rounds(ratios):
    """Each peer's ratios over the rounds: {"ours", "peer" (the rows' labels), "rounds", and per ratio its summary
    (median, min, max)}, for the ratios that came from several rounds."""
    pairs = {}
    for ratio in ratios:
        if "round" in ratio:
            pairs.setdefault((ratio["ours"], ratio["peer"]), []).append(ratio)
    merged = []
    for (ours, peer), rounds in pairs.items():
        entry = {"ours": ours, "peer": peer, "rounds": len(rounds)}
        for key in (key for key in rounds[0] if key not in ("ours", "peer", "round")):
            values = [ratio[key] for ratio in rounds if ratio[key] is not None]
            entry[key] = summary(values) if values else None
        merged.append(entry)
    return merged


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = released_config(quick=args.quick)

    print(f"measuring read bandwidth ({args.bandwidth_bytes / 2**30:.2f} GiB array)", file=sys.stderr, flush=True)
    bandwidth = read_bandwidth(args.bandwidth_bytes)
    gc.collect()
    rate = bandwidth["bytes_per_second"]["median"]
    print(f"read bandwidth {rate / 1e9:.1f} GB/s (median)", file=sys.stderr, flush=True)

    configurations = plan_configurations(args, config)
    rows = []
    for round_number, configuration in itertools.product(range(1, args.rounds + 1), configurations):
        row = {key: configuration[key] for key in ("label", "precision", "bits", "load_path")}
        if args.rounds > 1:
            row["round"] = round_number
        print(f"== {with_round(row['label'], row)}: {configuration['load_path']}", file=sys.stderr, flush=True)
        if configuration.get("peer"):
            row["peer_of"] = configuration["peer"]
        row["output_layer_bits"] = configuration.get("output_layer_bits", 16)
        # A shared machine's bandwidth moves by half or more between minutes: each row's roofline uses the
        # bandwidth read just before its worker, between its runs and after it (in this process: the
        # worker's memory figures never see the array).
        before = read_bandwidth(args.bandwidth_bytes)["bytes_per_second"]["runs"]
        gc.collect()
        row.update(run_worker(configuration, args))
        after = read_bandwidth(args.bandwidth_bytes)["bytes_per_second"]["runs"]
        gc.collect()
        pauses = row.pop("bandwidth_pauses", [])
        row["bandwidth_bytes_per_second"] = summary(before + [rate for pause in pauses for rate in pause] + after)
        add_rooflines(row, config, args, row["bandwidth_bytes_per_second"]["median"], pauses)
        rows.append(row)

    results = {
        "harness": {
            "quick": args.quick,
            "shapes": {key: config[key] for key in ("num_layers", "hidden_size", "ffn_hidden_size", "padded_vocab_size")},
            "threads": args.threads,
            "runs": args.runs,
            "prefill_lengths": args.prefill_lengths,
            "batches": args.batches,
            "new_tokens": args.new_tokens,
            "output_layer_bits": args.output_layer_bits,
            "seed": args.seed,
            "rounds": args.rounds,
        },
        "machine": describe_machine(args.device),
        "bandwidth": bandwidth,
        "results": rows,
        "peer_ratios": peer_ratios(rows, args),
    }
    results["peer_ratios_over_rounds"] = ratios_over_rounds(results["peer_ratios"])
    has_chart = write_reports(results, args.out, args.readme)
    print((args.out / "results.md").read_text())
    if not has_chart:
        print("matplotlib is not installed: no chart written (pip install matplotlib)", file=sys.stderr)
    print(f"results written to {args.out}", file=sys.stderr)
    failed = [with_round(row["label"], row) for row in rows if row.get("error")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
