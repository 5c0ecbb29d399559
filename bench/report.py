"""The harness's outputs: results.json, a Markdown table (results.md), a chart (results.png), README sections."""

import json
import os
from pathlib import Path

from .protocol import WARMUP_NEW_TOKENS, WARMUP_PROMPT_LENGTH

README_START = "<!-- bench-results:start -->"
README_END = "<!-- bench-results:end -->"
CHART_NAME = "results.png"


def _gigabytes(value):
    return None if value is None else value / 1e9


def _gb(value):
    return "—" if value is None else f"{value / 1e9:.2f}"


def _rate(stats):
    """'median (min–max)' of a summary, to three significant digits."""
    if stats is None:
        return "—"
    return f"{stats['median']:.3g} ({stats['min']:.3g}–{stats['max']:.3g})"


def _speed(row, section, key):
    entry = (row.get(section) or {}).get(key)
    return entry["tokens_per_second"] if entry else None


def machine_line(machine, harness):
    memory = f", {machine['memory_bytes'] / 2**30:.1f} GiB RAM" if machine.get("memory_bytes") else ""
    gpu = f", {machine['gpu']} ({machine['gpu_memory_bytes'] / 2**30:.0f} GiB)" if machine.get("gpu") else ""
    return (
        f"{machine['cpu']}, {machine.get('isa', 'ISA not recorded')}, {machine['cpu_count']} cores ({harness['threads']} threads used){memory}{gpu}; "
        f"{machine['platform']}, Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}; commit {machine['commit']}; {machine['date']}"
    )


def _first_generate(row):
    """The first generate's seconds, with its first token's and its page faults where the row has them."""
    if "first_generate_seconds" not in row:
        return "—"
    split = row.get("first_generate")
    if not split:
        return f"{row['first_generate_seconds']:.1f}"
    read = split.get("storage_read_bytes")
    return (
        f"{row['first_generate_seconds']:.1f}: {split['first_token_seconds']:.2f}, "
        f"{split['major_faults']} / {split['minor_faults']}, " + ("—" if read is None else f"{read / 1e6:.0f} MB")
    )


def with_round(text, entry):
    """`text` (a row's label or load path, a ratio's side) naming the round of `entry` (a row or a ratio) where the
    rows were measured in rounds (`--rounds`)."""
    return text + (f" (round {entry['round']})" if "round" in entry else "")


def _peer_ratio_lines(ratios, over_rounds=()):
    """The table of ours / a peer's, one line per peer row: speeds above 1 are ours faster, times and memory below 1
    ours smaller; with several rounds, then each ratio's median over the rounds (min–max)."""
    if not ratios:
        return []
    keys = [key for key in ratios[0] if key not in ("ours", "peer", "round")]
    lines = ["", "Ours / the peer's (speeds: above 1 ours faster; first generate and memory: below 1 ours smaller):", ""]
    lines += ["| ours | peer | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for ratio in ratios:
        cells = [with_round(ratio["ours"], ratio), with_round(ratio["peer"], ratio)] + [
            "—" if ratio[key] is None else f"{ratio[key]:.2f}x" for key in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for merged in over_rounds:
        cells = [merged["ours"], f"{merged['peer']}, median of {merged['rounds']} rounds (min–max)"] + [
            "—" if merged[key] is None else f"**{merged[key]['median']:.2f}x** ({merged[key]['min']:.2f}–{merged[key]['max']:.2f})"
            for key in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results, image_path):
    harness, machine, bandwidth = results["harness"], results["machine"], results["bandwidth"]
    rate = bandwidth["bytes_per_second"]
    prefill_lengths = harness["prefill_lengths"]
    batches = harness["batches"]
    shapes = "tiny `--quick` shapes" if harness["quick"] else "ChatGLM2-6B shapes"
    cuda = machine["device"] == "cuda"
    lines = [
        f"**{shapes}, random weights, device {machine['device']}.** "
        f"Machine: {machine_line(machine, harness)}.",
        "",
        f"Memory read bandwidth: **{rate['median'] / 1e9:.1f} GB/s** ({bandwidth['method']}; median of "
        f"{len(rate['runs'])}, {rate['min'] / 1e9:.1f}–{rate['max'] / 1e9:.1f}). Speeds are tokens/s, the median "
        f"of {harness['runs']} run(s) (min–max). Decode: {harness['new_tokens']} new tokens after a "
        f"{prefill_lengths[0]}-token prompt through `generate`; at batch > 1 the tokens of all sequences count. "
        f"dtype: the model's floating point dtype (`dtype=\"auto\"` keeps the checkpoint's float16). "
        f"First generate: the first `generate` call after loading ({WARMUP_PROMPT_LENGTH} prompt tokens, {WARMUP_NEW_TOKENS} new), one-time work included; "
        f"then its first token's seconds, its page faults (major ones read the checkpoint from the disk, minor ones map pages already in memory) and the bytes it read from the disk. "
        f"The roofline is the bytes one decode step must read (quantized matrices at their precision with their "
        f"scales, `output_layer` and the rest at 2 bytes unless quantized, the KV cache) divided by the read bandwidth "
        f"measured before that row's worker, between its runs (the worker waits meanwhile) and after it (column "
        f"read GB/s: the median of those readings; the figure above was read once at the start); per run: each "
        f"run's speed over the roofline at the bandwidth read just before and just after that run (median, min–max). "
        f"Peak RSS (VmHWM) also counts the pages of a memory-mapped checkpoint that loading touched, which the "
        f"kernel can drop and re-read; peak anonymous is the highest RssAnon (sampled every 20 ms), the memory "
        f"that cannot be given back. "
        f"Other processes: the CPU time other processes (and hypervisor steal) took while the configuration "
        f"ran, in cores; above zero, they competed with the measurement.",
        "",
    ]
    header = ["precision", "weights loaded from", "dtype", "load (s)", "first generate (s): first token (s), page faults from disk / memory, read from disk", "RSS after load (GB)", "RSS after runs (GB)", "peak RSS (GB)", "peak anonymous (GB)"]
    header += [f"prefill {length} (tok/s)" for length in prefill_lengths]
    header += [f"decode b{batch} (tok/s)" for batch in batches]
    header += ["read GB/s", f"b{batches[0]} roofline (tok/s)", f"b{batches[0]} % of roofline", f"b{batches[0]} % of roofline per run"]
    header.append("other processes (cores)")
    if cuda:
        header += ["peak CUDA (GB)", "8192 tokens: peak (GB), fits 6 GiB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["results"]:
        if row.get("error"):
            cells = [row["precision"], with_round(row["load_path"], row), f"failed: {row['error']}"] + [""] * (len(header) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        first = (row.get("roofline") or {}).get(f"batch{batches[0]}")
        cells = [
            row["precision"],
            with_round(row["load_path"], row),
            row["dtype"],
            f"{row['load_seconds']:.1f}",
            _first_generate(row),
            _gb(row["rss_after_load_bytes"]),
            _gb(row.get("rss_after_runs_bytes")),
            _gb(row["peak_rss_bytes"]),
            _gb(row.get("peak_anonymous_bytes")),
        ]
        cells += [_rate(_speed(row, "prefill", str(length))) for length in prefill_lengths]
        cells += [_rate(_speed(row, "decode", f"batch{batch}")) for batch in batches]
        row_rate = row.get("bandwidth_bytes_per_second")
        cells.append(f"{row_rate['median'] / 1e9:.1f}" if row_rate else "—")
        cells += [f"{first['tokens_per_second']:.3g}", f"{100 * first['fraction']:.0f}%"] if first else ["—", "—"]
        per_run = (first or {}).get("fraction_per_run")
        cells.append(f"{100 * per_run['median']:.0f}% ({100 * per_run['min']:.0f}–{100 * per_run['max']:.0f}%)" if per_run else "—")
        cells.append("—" if row["other_processes_cores"] is None else f"{row['other_processes_cores']:.2f}")
        if cuda:
            cells.append(_gb(row.get("cuda_peak_run_bytes")))
            long = row.get("long_conversation")
            cells.append(
                f"{_gb(long['conversation_8192_peak_reserved_bytes'])}, {'yes' if long['fits_6_gib'] else 'no'}" if long else "—"
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += _peer_ratio_lines(results.get("peer_ratios"), results.get("peer_ratios_over_rounds") or ())
    if image_path:
        lines += ["", f"![decode and prefill speed, memory]({image_path})"]
    return "\n".join(lines) + "\n"


def write_chart(results, path):
    """Decode and prefill speed with min–max bars and the roofline, and memory, per configuration.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    harness = results["harness"]
    rows = [row for row in results["results"] if not row.get("error")]
    timed = [row for row in rows if row.get("decode")]
    figure, (decode_axis, prefill_axis, memory_axis) = plt.subplots(1, 3, figsize=(16, 6))

    def bars(axis, group_rows, series, ylabel, title):
        """Grouped bars: one group per row, one bar per (label, getter) in `series`."""
        width = 0.8 / max(1, len(series))
        for index, (label, getter) in enumerate(series):
            positions, heights, lows, highs = [], [], [], []
            for group, row in enumerate(group_rows):
                stats = getter(row)
                if stats is None:
                    continue
                median = stats["median"] if isinstance(stats, dict) else stats
                positions.append(group + (index - (len(series) - 1) / 2) * width)
                heights.append(median)
                lows.append(median - stats["min"] if isinstance(stats, dict) else 0)
                highs.append(stats["max"] - median if isinstance(stats, dict) else 0)
            axis.bar(positions, heights, width, yerr=[lows, highs], capsize=3, label=label)
        axis.set_xticks(range(len(group_rows)), [with_round(row["label"], row) for row in group_rows], rotation=35, ha="right")
        axis.set_ylabel(ylabel)
        axis.set_title(title)

    first_batch = harness["batches"][0]
    bars(
        decode_axis,
        timed,
        [(f"batch {batch}", lambda row, batch=batch: _speed(row, "decode", f"batch{batch}")) for batch in harness["batches"]],
        "tokens/s",
        f"decode, {harness['new_tokens']} new tokens (median, min–max)",
    )
    roofline = [(group, row["roofline"][f"batch{first_batch}"]["tokens_per_second"]) for group, row in enumerate(timed) if row.get("roofline")]
    if roofline:
        decode_axis.scatter(*zip(*roofline), marker="_", s=900, color="black", label=f"batch {first_batch} roofline", zorder=3)
    decode_axis.legend()
    bars(
        prefill_axis,
        timed,
        [(f"{length} tokens", lambda row, length=length: _speed(row, "prefill", str(length))) for length in harness["prefill_lengths"]],
        "tokens/s",
        "prefill",
    )
    prefill_axis.legend()
    bars(
        memory_axis,
        rows,
        [
            ("RSS after load", lambda row: _gigabytes(row.get("rss_after_load_bytes"))),
            ("RSS after runs", lambda row: _gigabytes(row.get("rss_after_runs_bytes"))),
            ("peak RSS", lambda row: _gigabytes(row.get("peak_rss_bytes"))),
            ("peak anonymous", lambda row: _gigabytes(row.get("peak_anonymous_bytes"))),
        ],
        "GB",
        "memory",
    )
    memory_axis.legend()
    machine = results["machine"]
    shapes = "tiny --quick shapes" if harness["quick"] else "ChatGLM2-6B shapes"
    figure.suptitle(
        f"{shapes}, {machine['device']} — {machine['cpu']}, {harness['threads']} threads, "
        f"{results['bandwidth']['bytes_per_second']['median'] / 1e9:.1f} GB/s read — {machine['date']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def update_readme(readme, results, chart_path):
    """Replace the text between the bench-results markers of `readme` with the latest table and chart."""
    readme = Path(readme)
    check_readme(readme)
    text = readme.read_text()
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    image = os.path.relpath(chart_path, readme.parent) if chart_path else None
    readme.write_text(head + README_START + "\n" + markdown(results, image) + README_END + tail)


def check_readme(readme):
    """Fail before a long run, not after it, when a README to update lacks the markers."""
    text = Path(readme).read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no '{README_START}' ... '{README_END}' section to update")


def write_reports(results, out_dir, readmes=()):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart_path = out_dir / CHART_NAME
    has_chart = write_chart(results, chart_path)
    results["chart"] = CHART_NAME if has_chart else None
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(results, CHART_NAME if has_chart else None))
    for readme in readmes:
        update_readme(readme, results, chart_path if has_chart else None)
    return has_chart
