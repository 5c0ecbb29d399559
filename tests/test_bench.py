"""The benchmark harness (`bench/`): checkpoints in the released layout, and a `--quick` run end to end.

These tests check that the harness works and writes what it promises; they never assert a speed
(tiny shapes on a shared CI machine measure nothing).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.checkpoint import MARKER, ensure_fp16_shards, ensure_quantized_file, load_quantize_weight  # noqa: E402
from bench.model_shapes import decode_roofline, release_tensors, released_config  # noqa: E402
from bench.report import README_END, README_START  # noqa: E402

QUICK_LABELS = [
    "bf16",
    "int8",
    "int8, bf16",
    "int8, int8 output_layer",
    "int8 via quantize",
    "int4",
    "int4, bf16",
    "int4, int8 output_layer",
    "int4 via quantize",
]
# Quantized files load as stored (the release's float16) and in bfloat16; the float model in bfloat16.
BFLOAT16_LABELS = {"bf16", "int8, bf16", "int8 via quantize", "int4, bf16", "int4 via quantize"}


def test_release_tensor_list_matches_the_6b_checkpoint():
    tensors = release_tensors(released_config())
    assert len(tensors) == 200
    assert sum(tensor.numel * 2 for tensor in tensors) == 12_487_168_064  # spec §2, fp16 bytes
    shapes = {tensor.name: tensor.shape for tensor in tensors}
    assert shapes["transformer.encoder.layers.27.self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] == (4096, 13696)
    assert shapes["transformer.output_layer.weight"] == (65024, 4096)
    quantized = sum(tensor.numel for tensor in tensors if tensor.quantized)
    assert round(quantized / 1e9, 2) == 5.71  # spec §7 size arithmetic


def test_int4_roofline_at_28_gb_per_second_is_about_8_tokens():
    # The figure: 2.85 GB of int4 matrices + 0.53 GB output_layer per token at 28 GB/s.
    roofline = decode_roofline(released_config(), 4, 28e9, prompt_length=128, new_tokens=64, batch=1)
    assert 8.0 < roofline["tokens_per_second"] < 8.5


def test_each_run_is_measured_against_the_bandwidth_read_on_either_side_of_it():
    # A shared host's bandwidth moves between minutes: a run is held to the readings next to it.
    from types import SimpleNamespace

    from bench.__main__ import add_rooflines
    from bench.system import summary

    args = SimpleNamespace(batches=[1], prefill_lengths=[128], new_tokens=64)
    row = {"bits": 4, "output_layer_bits": 16, "decode": {"batch1": {"tokens_per_second": summary([2.0, 6.0])}}}
    add_rooflines(row, released_config(), args, 30e9, [[10e9], [30e9], [50e9]])
    roofline = row["roofline"]["batch1"]
    step_bytes = roofline["bytes_per_step"]
    assert roofline["fraction_per_run"]["runs"] == pytest.approx([2.0 * step_bytes / 20e9, 6.0 * step_bytes / 40e9])
    assert roofline["fraction"] == pytest.approx(4.0 * step_bytes / 30e9)  # the median speed at the row's bandwidth


def test_roofline_counts_a_quantized_output_layer_at_its_bits():
    config = released_config()
    plain = decode_roofline(config, 4, 28e9, prompt_length=128, new_tokens=64, batch=1)
    int8_output = decode_roofline(config, 4, 28e9, prompt_length=128, new_tokens=64, batch=1, output_layer_bits=8)
    vocab, hidden = config["padded_vocab_size"], config["hidden_size"]
    # 2 bytes per weight become 1, plus one 2-byte scale per row.
    assert plain["bytes_per_step"] - int8_output["bytes_per_step"] == vocab * hidden - 2 * vocab


@pytest.fixture(scope="module")
def quick_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-checkpoints")
    config = released_config(quick=True)
    fp16 = ensure_fp16_shards(root / "fp16", config, seed=0)
    int4 = ensure_quantized_file(root / "int4", config, seed=0, bits=4)
    return config, fp16, int4


def test_fp16_shards_follow_the_release_layout(quick_checkpoints):
    config, fp16, _ = quick_checkpoints
    index = json.loads((fp16 / "pytorch_model.bin.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert shard_names == sorted(path.name for path in fp16.glob("pytorch_model-*-of-*.bin"))
    state_dict = {}
    for name in shard_names:
        state_dict.update(torch.load(fp16 / name, weights_only=True))
    expected = {tensor.name: tensor.shape for tensor in release_tensors(config)}
    assert {name: tuple(tensor.shape) for name, tensor in state_dict.items()} == expected
    assert all(tensor.dtype == torch.float16 for tensor in state_dict.values())
    assert index["metadata"]["total_size"] == sum(tensor.nbytes for tensor in state_dict.values())
    assert torch.equal(state_dict["transformer.encoder.final_layernorm.weight"], torch.ones(config["hidden_size"], dtype=torch.float16))
    rotary_dim = config["kv_channels"] // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    assert torch.equal(state_dict["transformer.rotary_pos_emb.inv_freq"], inv_freq.half())
    weight = state_dict["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"].float()
    assert 0.015 < weight.std().item() < 0.025


def test_int4_file_is_the_quantized_fp16_checkpoint(quick_checkpoints):
    config, fp16, int4 = quick_checkpoints
    assert [path.name for path in int4.glob("*.bin")] == ["pytorch_model.bin"]
    packed = torch.load(int4 / "pytorch_model.bin", weights_only=True)
    name = "transformer.encoder.layers.1.self_attention.dense.weight"
    index = json.loads((fp16 / "pytorch_model.bin.index.json").read_text())
    float_weight = torch.load(fp16 / index["weight_map"][name], weights_only=True)[name]
    qweight, scale = load_quantize_weight()(float_weight, 4)
    assert packed[name].dtype == torch.int8 and packed[name].shape == (config["hidden_size"], config["hidden_size"] // 2)
    assert torch.equal(packed[name], qweight)
    assert packed[name + "_scale"].dtype == torch.float16 and torch.equal(packed[name + "_scale"], scale)
    # Embedding, output layer, norms and the QKV bias stay floating point (spec §6).
    assert packed["transformer.output_layer.weight"].dtype == torch.float16
    assert packed["transformer.encoder.layers.0.self_attention.query_key_value.bias"].dtype == torch.float16


def test_checkpoints_are_reused_until_the_request_changes(quick_checkpoints, tmp_path):
    config, fp16, _ = quick_checkpoints
    marker_time = (fp16 / MARKER).stat().st_mtime_ns
    ensure_fp16_shards(fp16, config, seed=0)
    assert (fp16 / MARKER).stat().st_mtime_ns == marker_time

    folder = tmp_path / "fp16"
    ensure_fp16_shards(folder, config, seed=0)
    first = torch.load(next(folder.glob("pytorch_model-00001-*.bin")), weights_only=True)
    ensure_fp16_shards(folder, config, seed=1)
    assert json.loads((folder / MARKER).read_text())["seed"] == 1
    second = torch.load(next(folder.glob("pytorch_model-00001-*.bin")), weights_only=True)
    name = "transformer.embedding.word_embeddings.weight"
    assert not torch.equal(first[name], second[name])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m bench --quick` into temporary folders, updating a README section, as a user runs it."""
    work = tmp_path_factory.mktemp("bench-quick")
    readme = work / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{README_START}\nold table\n{README_END}\nafter\n")
    out = work / "results"
    command = [sys.executable, "-m", "bench", "--quick", "--output-layer-bits", "8"]
    command += ["--cache-dir", str(work / "cache"), "--out", str(out), "--readme", str(readme)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return out, readme, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_measures_every_configuration(quick_run):
    _, _, results = quick_run
    assert results["harness"]["quick"] is True
    assert results["bandwidth"]["bytes_per_second"]["median"] > 0
    assert {"cpu", "torch", "transformers", "date", "device"} <= set(results["machine"])
    rows = {row["label"]: row for row in results["results"]}
    assert list(rows) == QUICK_LABELS
    for label, row in rows.items():
        assert not row.get("error"), (label, row.get("error"))
        assert row["load_seconds"] > 0 and row["peak_rss_bytes"] > 0
        assert row["rss_after_load_bytes"] > 0
        assert 0 < row["peak_anonymous_bytes"] <= row["peak_rss_bytes"]
        assert row["output_layer_bits"] == (8 if "output_layer" in label else 16)
        assert row["dtype"] == ("bfloat16" if label in BFLOAT16_LABELS else "float16"), label
        if "via quantize" in label:
            assert "decode" not in row  # that path is measured for loading and memory only
            continue
        for length in results["harness"]["prefill_lengths"]:
            stats = row["prefill"][str(length)]["tokens_per_second"]
            assert stats["min"] <= stats["median"] <= stats["max"]
        # The row's own bandwidth, read before its worker, between its runs, after the last run and after
        # the worker (10 samples each), sets its roofline.
        rate = row["bandwidth_bytes_per_second"]
        assert len(rate["runs"]) == 10 * (3 + results["harness"]["runs"]) and rate["min"] <= rate["median"] <= rate["max"]
        for batch in results["harness"]["batches"]:
            assert row["decode"][f"batch{batch}"]["tokens_per_second"]["median"] > 0
            roofline = row["roofline"][f"batch{batch}"]
            assert roofline["bytes_per_step"] > 0 and roofline["fraction"] > 0
            assert roofline["tokens_per_second"] == pytest.approx(batch * rate["median"] / roofline["bytes_per_step"])
            # Each run against the bandwidth read in the pauses on either side of it.
            per_run = roofline["fraction_per_run"]
            assert len(per_run["runs"]) == results["harness"]["runs"] and per_run["min"] <= per_run["median"] <= per_run["max"] and per_run["min"] > 0


@pytest.mark.slow
def test_quick_run_writes_the_markdown_table_and_readme_section(quick_run):
    out, readme, results = quick_run
    table = (out / "results.md").read_text()
    assert "| precision | weights loaded from |" in table
    for row in results["results"]:
        assert f"| {row['precision']} | {row['load_path']} |" in table
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text and "| precision | weights loaded from |" in text


@pytest.mark.slow
def test_quick_run_draws_the_chart(quick_run):
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib; without it the harness skips it")
    out, readme, results = quick_run
    assert results["chart"] == "results.png"
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "](results/results.png)" in readme.read_text()


def test_unknown_precision_is_refused_before_any_work(tmp_path):
    command = [sys.executable, "-m", "bench", "--quick", "--precisions", "fp8", "--cache-dir", str(tmp_path)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert "--precisions" in completed.stderr and "fp8" in completed.stderr
    assert not any(tmp_path.iterdir())


def test_kernel_timings_take_turns_between_the_compared_forwards():
    # bench.kernels compares chatglm_cpu's instruction sets on a shared machine: each repeat times every
    # forward once, in turn, so that a drift in bandwidth falls on all of them (it made a sequential
    # comparison show one set 25% slower than the other, equal when interleaved).
    from bench.kernels import time_layers

    calls = []
    layers = [torch.nn.Linear(8, 4), torch.nn.Linear(6, 4)]
    forwards = [lambda layer, x, name=name: calls.append((name, layer.in_features)) for name in ("a", "b")]
    timings = time_layers(layers, 2, torch.float32, 3, forwards)
    assert [len(walls) for walls, cpus in timings] == [3, 3] and all(len(cpus) == 3 for _, cpus in timings)
    untimed, timed = calls[:4], calls[4:]
    assert untimed == [("a", 8), ("a", 6), ("b", 8), ("b", 6)]
    assert timed == [("a", 8), ("a", 6), ("b", 8), ("b", 6)] * 3


@pytest.mark.parametrize(
    "device, kernels, rows",
    [
        ("cpu", "auto,torch,onnxruntime", [("bf16", ["--cpu-kernel", "auto"]), ("bf16, torch", ["--cpu-kernel", "torch"])]),
        ("cpu", "onnxruntime", [("bf16", [])]),  # quantized layers' kernel only: the float model as loaded
        ("cuda", "auto,torch", [("bf16", [])]),  # no CPU kernel runs there
    ],
)
def test_the_float_model_gets_a_row_per_cpu_kernel_it_can_run(tmp_path, device, kernels, rows):
    from bench.__main__ import parse_args, plan_configurations

    args = parse_args(["--quick", "--precisions", "bf16", "--cpu-kernels", kernels, "--cache-dir", str(tmp_path)])
    args.device = device  # the plan only; nothing runs
    planned = plan_configurations(args, released_config(quick=True))
    assert [(row["label"], row["flags"]) for row in planned] == rows


def test_a_peer_row_follows_ours_of_its_precision_and_the_ratios_hold_ours_against_it(tmp_path):
    from bench.__main__ import parse_args, peer_ratios, plan_configurations

    gguf = tmp_path / "model-q4_0.gguf"
    gguf.write_bytes(b"GGUF")  # the plan only opens nothing
    args = parse_args(["--quick", "--precisions", "int8,int4", "--file-dtypes", "auto", "--no-quantize-path",
                       "--peer", "llama.cpp", "--peer-gguf", f"int4={gguf}", "--cache-dir", str(tmp_path / "cache")])
    planned = plan_configurations(args, released_config(quick=True))
    assert [row["label"] for row in planned] == ["int8", "int4", "int4, llama.cpp model-q4_0"]
    assert planned[-1]["gguf"] == gguf and planned[-1]["peer"] == "llama.cpp"

    def row(label, decode, prefill, first, resident, peak, anonymous, peer=None):
        return {"label": label, "precision": "int4", "peer_of": peer,
                "decode": {"batch1": {"tokens_per_second": {"median": decode}}, "batch4": {"tokens_per_second": {"median": 2 * decode}}},
                "prefill": {"16": {"tokens_per_second": {"median": prefill}}, "32": {"tokens_per_second": {"median": prefill}}},
                "first_generate_seconds": first, "rss_after_runs_bytes": resident, "peak_rss_bytes": peak, "peak_anonymous_bytes": anonymous}

    ours = row("int4", 10.0, 30.0, 0.5, 4e9, 4.5e9, 0.5e9)
    theirs = row("int4, llama.cpp q4_0", 8.0, 20.0, 2.0, 6e9, 7e9, 3e9, peer="llama.cpp")
    [ratio] = peer_ratios([ours, theirs], args)
    assert ratio["ours"] == "int4" and ratio["peer"] == "int4, llama.cpp q4_0"
    assert ratio["decode batch1"] == ratio["decode batch4"] == pytest.approx(1.25)
    assert ratio["prefill 16"] == pytest.approx(1.5)
    assert ratio["first generate"] == pytest.approx(0.25)
    assert ratio["resident after runs / peer peak"] == pytest.approx(4 / 7)
    assert ratio["peak anonymous"] == pytest.approx(1 / 6)


def test_in_rounds_each_peer_row_is_held_against_ours_of_its_round_and_the_median_is_reported(tmp_path):
    # On a shared host the bandwidth moves within minutes: ours and the peer's, taken in turns, are compared round
    # by round, never a fast round of one against a slow round of the other.
    from bench.__main__ import parse_args, peer_ratios, ratios_over_rounds
    from bench.report import _peer_ratio_lines

    gguf = tmp_path / "model-q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    args = parse_args(["--quick", "--precisions", "int4", "--peer", "llama.cpp", "--peer-gguf", f"int4={gguf}",
                       "--rounds", "3", "--cache-dir", str(tmp_path / "cache")])

    def row(label, round_number, decode, peer=None):
        return {"label": label, "round": round_number, "precision": "int4", "peer_of": peer,
                "decode": {f"batch{batch}": {"tokens_per_second": {"median": decode}} for batch in args.batches},
                "prefill": {str(length): {"tokens_per_second": {"median": 3 * decode}} for length in args.prefill_lengths}}

    speeds = [(10.0, 8.0), (14.0, 10.0), (9.0, 12.0)]  # ours, theirs per round: 1.25, 1.4, 0.75
    rows = [entry for number, (ours, theirs) in enumerate(speeds, 1)
            for entry in (row("int4", number, ours), row("int4, llama.cpp q4_0", number, theirs, peer="llama.cpp"))]
    ratios = peer_ratios(rows, args)
    assert [(ratio["round"], ratio["decode batch1"]) for ratio in ratios] == [(1, 1.25), (2, 1.4), (3, 0.75)]
    [merged] = ratios_over_rounds(ratios)
    assert merged["ours"] == "int4" and merged["peer"] == "int4, llama.cpp q4_0" and merged["rounds"] == 3
    assert (merged["decode batch1"]["median"], merged["decode batch1"]["min"], merged["decode batch1"]["max"]) == (1.25, 0.75, 1.4)
    assert merged["first generate"] is None
    lines = "\n".join(_peer_ratio_lines(ratios, [merged]))
    assert "| int4 (round 2) | int4, llama.cpp q4_0 (round 2) | 1.40x |" in lines
    assert "| int4 | int4, llama.cpp q4_0, median of 3 rounds (min–max) | **1.25x** (0.75–1.40) |" in lines


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rounds", "0"], "--rounds takes a count of at least 1"),
        (["--peer", "llama.cpp"], "--peer and --peer-gguf go together"),
        (["--peer", "llama.cpp", "--peer-gguf", "int4=/nonexistent/q4_0.gguf"], "/nonexistent/q4_0.gguf is not a file"),
        (["--peer", "llama.cpp", "--peer-gguf", "int3=x.gguf"], "PRECISION=FILE"),
    ],
)
def test_peer_arguments_are_checked_before_any_work(tmp_path, extra, message):
    command = [sys.executable, "-m", "bench", "--quick", "--cache-dir", str(tmp_path), *extra]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and message in completed.stderr
    assert not any(tmp_path.iterdir())


def test_the_llama_cpp_peer_needs_no_torch_and_names_a_missing_llama_cpp_in_one_line(tmp_path):
    # It runs in whatever Python has llama-cpp-python (--peer-python), which may have no torch.
    script = (
        "import runpy, sys; sys.modules['torch'] = None; sys.modules['llama_cpp'] = None; "
        f"sys.argv = ['bench.llama_cpp_peer', '--gguf', 'x.gguf', '--label', 'x', '--threads', '1', '--prefill-lengths', '8', "
        f"'--batches', '1', '--new-tokens', '2', '--runs', '1', '--output', {str(tmp_path / 'out.json')!r}]; "
        "runpy.run_module('bench.llama_cpp_peer', run_name='__main__')"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    assert completed.stderr.strip().count("\n") == 0 and "cannot import llama_cpp" in completed.stderr  # first and only line
    assert "install llama-cpp-python" in completed.stderr and not (tmp_path / "out.json").exists()


def test_dispatch_calls_counts_a_decode_steps_python_calls_by_file(tmp_path):
    from bench import dispatch_calls

    out = tmp_path / "calls.json"
    dispatch_calls.main(["--precisions", "int4", "--cpu-kernels", "torch", "--steps", "2", "--cache-dir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    counts = row["calls_per_step"]
    assert row["precision"] == "int4" and row["cpu_kernel"] == "torch"
    # every projection of both layers runs through quantization.py, the layers through modeling_chatglm.py
    assert counts["quantization.py"] >= 4 * result["layers"] and counts["modeling_chatglm.py"] >= result["layers"]
    assert counts["total"] == sum(value for key, value in counts.items() if key != "total")
