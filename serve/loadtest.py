"""Load test of python -m serve: one client at a time, then many clients at once, on loopback.

    python -m serve.loadtest                          # starts the server on the demo model, 32 clients x 4 requests
    python -m serve.loadtest --clients 8 --requests 2 --server-arg=--max-batch-size=4
    python -m serve.loadtest --url http://127.0.0.1:8000 --model NAME   # a server that is already running
    python -m serve.loadtest --mixed --baseline-root /tmp/old-tree   # the mixed load, on this checkout and another, in turns

Each request is a streamed chat completion of one of the demo dialog set's first-turn queries,
greedy (temperature 0), through the official `openai` client (no retries). The sequential phase
sends them one after another and its answers are the reference: in the concurrent phase every
answer must equal the sequential answer to the same query (a batched answer that differs is
counted as "wrong"), and every request must end as an answer or a 429/503 refusal ("lost" counts
the rest). Prints a table and writes JSON to bench/results/serve-load.json (written to a temporary
file, then renamed into place).

`--mixed`: completions arriving as a Poisson process, prompts of 16-1000 tokens and answers of
8-256 (log-uniform), each compared with the same request sent alone; the short requests' TTFT
against an idle server's; then a running request's time between chunks while a newcomer's
1000-token prompt is read. Writes bench/results/serve-mixed-load.json.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import openai

from .process import REPO_ROOT, ServerProcess

DIALOGS = REPO_ROOT / "demo" / "data" / "dialogs.jsonl"
RESULTS = REPO_ROOT / "bench" / "results" / "serve-load.json"


def demo_queries(count):
    """The first `count` distinct first-turn queries of the demo dialog set."""
    queries = []
    for line in DIALOGS.read_text(encoding="utf-8").splitlines():
        query = json.loads(line)[0][0]
        if query not in queries:
            queries.append(query)
        if len(queries) == count:
            break
    return queries


async def one_request(client, model, query, max_tokens):
    """{"query", "status", "text", "latency_s", "ttft_s", "completion_tokens"}; status "ok", "refused" or "lost"."""
    started = time.perf_counter()
    record = {"query": query, "status": "lost", "text": "", "latency_s": None, "ttft_s": None, "completion_tokens": 0}
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": query}],
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        finish = None
        async for chunk in stream:
            if chunk.usage:
                record["completion_tokens"] = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if record["ttft_s"] is None:
                        record["ttft_s"] = time.perf_counter() - started
                    record["text"] += choice.delta.content
                finish = choice.finish_reason or finish
        if finish in ("stop", "length"):
            record["status"] = "ok"
    except openai.APIStatusError as error:
        if error.status_code in (429, 503):
            record["status"] = "refused"
        else:
            record["error"] = f"{error.status_code}: {error.message}"
    except openai.APIError as error:
        record["error"] = str(error)
    record["latency_s"] = time.perf_counter() - started
    return record


async def run_phase(url, model, api_key, clients, requests_per_client, queries, max_tokens):
    """`clients` concurrent clients, each sending `requests_per_client` requests one after another."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=600)

    async def one_client(number):
        records = []
        for step in range(requests_per_client):
            query = queries[(number * requests_per_client + step) % len(queries)]
            records.append(await one_request(client, model, query, max_tokens))
        return records

    started = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(number) for number in range(clients)))
    wall = time.perf_counter() - started
    await client.close()
    return [record for records in per_client for record in records], wall


def percentile(values, fraction):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarize(name, clients, requests_per_client, records, wall, reference):
    answered = [record for record in records if record["status"] == "ok"]
    wrong = [record for record in answered if reference is not None and record["text"] != reference[record["query"]]]
    latencies = [record["latency_s"] for record in answered]
    ttfts = [record["ttft_s"] for record in answered if record["ttft_s"] is not None]
    tokens = sum(record["completion_tokens"] for record in answered)
    return {
        "phase": name,
        "clients": clients,
        "requests_per_client": requests_per_client,
        "requests": len(records),
        "answered": len(answered),
        "refused": sum(record["status"] == "refused" for record in records),
        "lost": sum(record["status"] == "lost" for record in records),
        "wrong": len(wrong),
        "wall_s": wall,
        "requests_per_s": len(answered) / wall,
        "tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "mean_latency_s": statistics.fmean(latencies) if latencies else None,
    }


def table(phases):
    columns = [
        ("phase", "phase", "{}"),
        ("clients x requests", None, "{}"),
        ("answered", "answered", "{}"),
        ("refused", "refused", "{}"),
        ("lost", "lost", "{}"),
        ("wrong", "wrong", "{}"),
        ("wall (s)", "wall_s", "{:.1f}"),
        ("requests/s", "requests_per_s", "{:.2f}"),
        ("tokens/s", "tokens_per_s", "{:.1f}"),
        ("latency p50 (s)", "latency_p50_s", "{:.2f}"),
        ("latency p95 (s)", "latency_p95_s", "{:.2f}"),
        ("TTFT p50 (s)", "ttft_p50_s", "{:.2f}"),
        ("TTFT p95 (s)", "ttft_p95_s", "{:.2f}"),
    ]
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for phase in phases:
        cells = []
        for title, key, form in columns:
            if key is None:
                cells.append(f"{phase['clients']} x {phase['requests_per_client']}")
            else:
                cells.append("—" if phase[key] is None else form.format(phase[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(url, model, api_key, clients, requests_per_client, sequential_requests, max_tokens, query_count):
    """Both phases against a running server; returns the two summaries (sequential first)."""
    queries = demo_queries(query_count)
    records, wall = asyncio.run(run_phase(url, model, api_key, 1, sequential_requests, queries, max_tokens))
    reference = {record["query"]: record["text"] for record in records if record["status"] == "ok"}
    sequential = summarize("one at a time", 1, sequential_requests, records, wall, None)
    if not reference:
        raise RuntimeError(f"the server answered none of the {len(records)} sequential requests: {records[:1]}")
    # The concurrent phase asks the queries the sequential phase answered, and compares with those answers.
    records, wall = asyncio.run(run_phase(url, model, api_key, clients, requests_per_client, list(reference), max_tokens))
    concurrent = summarize("concurrent", clients, requests_per_client, records, wall, reference)
    return sequential, concurrent


def write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# --- the mixed load: Poisson arrivals, prompts and answers of many lengths ---

SHORT_PROMPT_TOKENS = 64  # a "short" request's prompt, for its TTFT
MIXED_RESULTS = REPO_ROOT / "bench" / "results" / "serve-mixed-load.json"


def log_uniform(generator, low, high):
    return round(math.exp(generator.uniform(math.log(low), math.log(high))))


def mixed_requests(tokenizer, count, rate, seed, prompt_range=(16, 1000), answer_range=(8, 256)):
    """`count` requests {"number", "at", "prompt", "max_tokens"}: arrival times of a Poisson process
    of `rate` per second, prompt and answer lengths log-uniform in their ranges (in tokens, the
    server's prefix included), prompts cut from the demo dialog set's answers."""
    generator = random.Random(seed)
    answers = [turn[1] for line in DIALOGS.read_text(encoding="utf-8").splitlines() for turn in json.loads(line)]
    corpus = tokenizer("".join(answers), add_special_tokens=False)["input_ids"]
    prefix = len(tokenizer("")["input_ids"])
    requests, at = [], 0.0
    for number in range(count):
        at += generator.expovariate(rate)
        length = log_uniform(generator, *prompt_range) - prefix
        start = generator.randrange(len(corpus) - length)
        prompt = tokenizer.decode(corpus[start : start + length])
        requests.append({"number": number, "at": at, "prompt": prompt, "max_tokens": log_uniform(generator, *answer_range)})
    return requests


def new_record(request):
    return {"number": request["number"], "status": "lost", "text": "", "ttft_s": None, "latency_s": None, "chunk_times": [], "prompt_tokens": None, "completion_tokens": 0}


async def one_completion(client, model, request, record=None):
    """A streamed greedy completion of exactly `max_tokens` tokens (vLLM's `min_tokens`); the record
    (`record`, filled as chunks arrive, or a new one) holds its text, status, TTFT, latency, token
    counts and the arrival time of every chunk from the request's start."""
    started = time.perf_counter()
    record = new_record(request) if record is None else record
    try:
        stream = await client.completions.create(
            model=model,
            prompt=request["prompt"],
            temperature=0,
            max_tokens=request["max_tokens"],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"min_tokens": request["max_tokens"]},
        )
        finish = None
        async for chunk in stream:
            if chunk.usage:
                record["prompt_tokens"], record["completion_tokens"] = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text:
                    now = time.perf_counter() - started
                    record["ttft_s"] = now if record["ttft_s"] is None else record["ttft_s"]
                    record["chunk_times"].append(now)
                    record["text"] += choice.text
                finish = choice.finish_reason or finish
        record["status"] = "ok" if finish in ("stop", "length") else "lost"
    except openai.APIStatusError as error:
        record["status"] = "refused" if error.status_code in (429, 503) else "lost"
        record["error"] = f"{error.status_code}: {error.message}"
    except openai.APIError as error:
        record["error"] = str(error)
    record["latency_s"] = time.perf_counter() - started
    return record


async def completions_alone(url, model, api_key, requests):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=600)
    records = [await one_completion(client, model, request) for request in requests]
    await client.close()
    return records


async def completions_arriving(url, model, api_key, requests):
    """Each request sent at its arrival time; (records, wall seconds)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=600)
    started = time.perf_counter()

    async def at_its_time(request):
        await asyncio.sleep(max(0.0, request["at"] - (time.perf_counter() - started)))
        return await one_completion(client, model, request)

    records = await asyncio.gather(*(at_its_time(request) for request in requests))
    wall = time.perf_counter() - started
    await client.close()
    return list(records), wall


def summarize_mixed(records, wall, reference, idle_ttft):
    answered = [record for record in records if record["status"] == "ok"]
    short = [record["ttft_s"] for record in answered if record["prompt_tokens"] <= SHORT_PROMPT_TOKENS]
    p99 = percentile(short, 0.99)
    return {
        "requests": len(records),
        "answered": len(answered),
        "lost": sum(record["status"] != "ok" for record in records),
        "wrong": sum(record["text"] != reference[record["number"]] for record in answered),
        "wall_s": wall,
        "tokens_per_s": sum(record["completion_tokens"] for record in answered) / wall,
        "short_requests": len(short),
        "short_ttft_p50_s": percentile(short, 0.5),
        "short_ttft_p99_s": p99,
        "short_ttft_p99_over_idle": p99 / idle_ttft if p99 and idle_ttft else None,
        "ttft_p50_s": percentile([record["ttft_s"] for record in answered], 0.5),
        "latency_p50_s": percentile([record["latency_s"] for record in answered], 0.5),
        "latency_p95_s": percentile([record["latency_s"] for record in answered], 0.95),
    }


async def newcomer_joins(url, model, api_key, runner, newcomer, join_after):
    """A running request (`runner`) and a long-prompt `newcomer` sent once the runner has streamed
    `join_after` chunks: the runner's median time between chunks before, and its longest while the
    newcomer's prompt is read (from the newcomer's submission to its first token)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=600)
    started = time.perf_counter()
    runner_record = new_record(runner)
    running = asyncio.ensure_future(one_completion(client, model, runner, runner_record))
    while not running.done() and len(runner_record["chunk_times"]) < join_after:
        await asyncio.sleep(0.001)
    joined_at = time.perf_counter() - started
    joining = await one_completion(client, model, newcomer)
    await running
    await client.close()
    chunks = runner_record["chunk_times"]
    gaps = [(later, later - earlier) for earlier, later in zip(chunks, chunks[1:])]
    before = [gap for at, gap in gaps if at < joined_at]
    first_token_at = joined_at + (joining["ttft_s"] or 0.0)
    during = [gap for at, gap in gaps if joined_at <= at <= first_token_at + max(before or [0.0])]
    return {
        "ok": runner_record["status"] == joining["status"] == "ok",
        "newcomer_prompt_tokens": joining["prompt_tokens"],
        "gap_p50_before_s": percentile(before, 0.5),
        "gap_max_during_join_s": max(during) if during else None,
        "newcomer_ttft_s": joining["ttft_s"],
    }


def median_ttft(url, model, api_key, request, times):
    records = asyncio.run(completions_alone(url, model, api_key, [request] * times))
    return statistics.median(record["ttft_s"] for record in records)


def run_mixed(servers, model, api_key, tokenizer, count, rate, seed, rounds, chunk):
    """The mixed load on each of `servers` ({name: url}), the phases in turns: each request alone
    (the references, and the idle TTFT of the short ones), then `rounds` rounds of the Poisson load,
    then a newcomer joining a running request. Returns {name: results}."""
    requests = mixed_requests(tokenizer, count, rate, seed)
    probes = mixed_requests(tokenizer, 4, 1.0, seed + 1, prompt_range=(16, 16), answer_range=(1, 1))[:1]
    probes += mixed_requests(tokenizer, 1, 1.0, seed + 2, prompt_range=(chunk, chunk), answer_range=(1, 1))
    runner = mixed_requests(tokenizer, 1, 1.0, seed + 3, prompt_range=(32, 32), answer_range=(256, 256))[0]
    newcomer = mixed_requests(tokenizer, 1, 1.0, seed + 4, prompt_range=(1000, 1000), answer_range=(8, 8))[0]
    results = {name: {"mixed": [], "join": []} for name in servers}
    for name, url in servers.items():
        alone = asyncio.run(completions_alone(url, model, api_key, requests))
        if any(record["status"] != "ok" for record in alone):
            raise RuntimeError(f"{name}: a request alone was not answered: {[record for record in alone if record['status'] != 'ok'][:1]}")
        short = [record["ttft_s"] for record in alone if record["prompt_tokens"] <= SHORT_PROMPT_TOKENS]
        results[name].update(
            reference={record["number"]: record["text"] for record in alone},
            idle_short_ttft_p50_s=percentile(short, 0.5),
            idle_short_ttft_p99_s=percentile(short, 0.99),
            idle_ttft_16_s=median_ttft(url, model, api_key, probes[0], 5),
            idle_ttft_chunk_s=median_ttft(url, model, api_key, probes[1], 5),
        )
    order = list(servers.items())
    for number in range(rounds):
        for name, url in order if number % 2 == 0 else order[::-1]:
            records, wall = asyncio.run(completions_arriving(url, model, api_key, requests))
            results[name]["mixed"].append(summarize_mixed(records, wall, results[name]["reference"], results[name]["idle_short_ttft_p50_s"]))
        for name, url in order if number % 2 == 0 else order[::-1]:
            results[name]["join"].append(asyncio.run(newcomer_joins(url, model, api_key, runner, newcomer, join_after=32)))
    names = list(servers)
    if len(names) == 2:
        first, second = (results[name]["reference"] for name in names)
        for name in names:
            results[name]["references_differing_between_servers"] = sum(first[number] != second[number] for number in first)
    for result in results.values():
        del result["reference"]
    return results


def mixed_table(results):
    columns = [
        ("round", None), ("answered", "answered"), ("lost", "lost"), ("wrong", "wrong"), ("wall (s)", "wall_s"),
        ("tokens/s", "tokens_per_s"), ("short TTFT p50 (s)", "short_ttft_p50_s"), ("short TTFT p99 (s)", "short_ttft_p99_s"),
        ("p99 / idle", "short_ttft_p99_over_idle"), ("latency p50 (s)", "latency_p50_s"), ("latency p95 (s)", "latency_p95_s"),
    ]  # fmt: skip
    lines = ["| server | " + " | ".join(title for title, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, result in results.items():
        for number, phase in enumerate(result["mixed"], 1):
            cells = [str(number) if key is None else _cell(phase[key]) for _, key in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| server | idle TTFT, short prompts p50 / p99 (s) | idle TTFT 16 / chunk-size prompt (s) | runner's gap before (s) | longest gap while the newcomer's prompt is read (s) | newcomer TTFT (s) |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        for join in result["join"]:
            lines.append(
                f"| {name} | {_cell(result['idle_short_ttft_p50_s'])} / {_cell(result['idle_short_ttft_p99_s'])} | {_cell(result['idle_ttft_16_s'])} / {_cell(result['idle_ttft_chunk_s'])} | "
                f"{_cell(join['gap_p50_before_s'])} | {_cell(join['gap_max_during_join_s'])} | {_cell(join['newcomer_ttft_s'])} |"
            )
    return "\n".join(lines)


def _cell(value):
    if value is None:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def start_servers(args, stack):
    """{"baseline": its url (with --baseline-root), "this": --url or a started server's}, started in `stack`."""
    servers = {}
    if args.baseline_root:
        servers["baseline"] = stack.enter_context(ServerProcess(*args.server_arg, root=args.baseline_root)).url
    servers["this"] = args.url or stack.enter_context(ServerProcess(*args.server_arg)).url
    return servers


def main_mixed(args):
    from transformers import AutoTokenizer

    from bench.system import describe_machine

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=True)
    settings = dict(count=args.count, rate=args.rate, seed=args.seed, rounds=args.rounds, chunk=args.prefill_chunk)
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        servers = start_servers(args, stack)
        results = run_mixed(servers, args.model, args.api_key, tokenizer, **settings)
    machine = describe_machine("cpu")
    payload = {
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "servers": {"this": args.url or f"python -m serve {' '.join(args.server_arg)}".strip(), "baseline": args.baseline_root and str(args.baseline_root)},
        "settings": settings | {"short_prompt_tokens": SHORT_PROMPT_TOKENS},
        "results": results,
    }
    print(f"{machine['cpu']}, {machine['cpu_count']} cores; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(mixed_table(results))
    write_json(args.output or MIXED_RESULTS, payload)
    print(f"wrote {args.output or MIXED_RESULTS}")
    bad = sum(phase["lost"] + phase["wrong"] for result in results.values() for phase in result["mixed"])
    return 1 if bad else 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m serve.loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start python -m serve on a free loopback port)")
    parser.add_argument("--model", default="tiny-chatglm2", help="model id to request (default: tiny-chatglm2)")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client in the concurrent phase")
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests in the one-at-a-time phase")
    parser.add_argument("--queries", type=int, default=16, help="distinct demo queries to cycle through")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--server-arg", action="append", default=[], help="argument for the started server (repeatable), e.g. --server-arg=--threads=1")
    parser.add_argument("--baseline-root", type=Path, help="also start the server of this checkout (e.g. an older commit's tree) and run every phase on both, in turns")
    parser.add_argument("--output", type=Path, help=f"where to write the JSON (default: {RESULTS.name}, with --mixed {MIXED_RESULTS.name} in bench/results)")
    mixed = parser.add_argument_group("the mixed load (--mixed)")
    mixed.add_argument("--mixed", action="store_true", help="Poisson arrivals of completions with prompts of 16-1000 tokens and answers of 8-256, and a newcomer joining a running request")
    mixed.add_argument("--tokenizer", default=str(REPO_ROOT / "demo" / "tiny-chatglm2"), help="tokenizer folder to cut prompts of given lengths (default: the demo model)")
    mixed.add_argument("--count", type=int, default=48, help="requests in the Poisson load")
    mixed.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    mixed.add_argument("--rounds", type=int, default=2, help="rounds of the Poisson load per server")
    mixed.add_argument("--seed", type=int, default=0)
    mixed.add_argument("--prefill-chunk", type=int, default=128, help="prompt length whose idle TTFT stands for one prefill chunk (the server's --prefill-chunk)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.mixed:
        return main_mixed(args)
    from bench.system import describe_machine

    settings = dict(
        model=args.model,
        api_key=args.api_key,
        clients=args.clients,
        requests_per_client=args.requests,
        sequential_requests=args.sequential_requests,
        max_tokens=args.max_tokens,
        query_count=args.queries,
    )
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        servers = start_servers(args, stack)
        results = {name: run(url, **settings) for name, url in servers.items()}
    phases, speedups = [], {}
    for name, (sequential, concurrent) in results.items():
        if len(results) > 1:
            sequential["phase"], concurrent["phase"] = f"{name}: one at a time", f"{name}: concurrent"
        phases += [sequential, concurrent]
        speedups[name] = concurrent["requests_per_s"] / sequential["requests_per_s"] if sequential["requests_per_s"] else None
    machine = describe_machine("cpu")
    payload = {
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "server": args.url or f"python -m serve {' '.join(args.server_arg)}".strip(),
        "baseline": args.baseline_root and str(args.baseline_root),
        "settings": settings | {"api_key": bool(args.api_key)},
        "phases": phases,
        "throughput_speedup": speedups["this"],
    }
    print(f"{machine['cpu']}, {machine['cpu_count']} cores; load average before {load_before[0]:.1f}; {payload['server']}")
    print(table(payload["phases"]))
    for name, speedup in speedups.items():
        print(f"{name}: concurrent / one at a time, requests/s: {speedup:.2f}x" if speedup else f"{name}: no sequential answers")
    write_json(args.output or RESULTS, payload)
    print(f"wrote {args.output or RESULTS}")
    bad = sum(phase["lost"] + phase["wrong"] for phase in phases)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
