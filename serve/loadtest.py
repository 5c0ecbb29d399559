"""Load test of python -m serve: one client at a time, then many clients at once, on loopback.

    python -m serve.loadtest                          # starts the server on the demo model, 32 clients x 4 requests
    python -m serve.loadtest --clients 8 --requests 2 --server-arg=--max-batch-size=4
    python -m serve.loadtest --url http://127.0.0.1:8000 --model NAME   # a server that is already running

Each request is a streamed chat completion of one of the demo dialog set's first-turn queries,
greedy (temperature 0), through the official `openai` client (no retries). The sequential phase
sends them one after another and its answers are the reference: in the concurrent phase every
answer must equal the sequential answer to the same query (a batched answer that differs is
counted as "wrong"), and every request must end as an answer or a 429/503 refusal ("lost" counts
the rest). Prints a table and writes JSON to bench/results/serve-load.json (written to a temporary
file, then renamed into place).
"""

import argparse
import asyncio
import json
import os
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
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
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
    if args.url:
        sequential, concurrent = run(args.url, **settings)
    else:
        with ServerProcess(*args.server_arg) as server:
            sequential, concurrent = run(server.url, **settings)
    speedup = concurrent["requests_per_s"] / sequential["requests_per_s"] if sequential["requests_per_s"] else None
    machine = describe_machine("cpu")
    payload = {
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "server": args.url or f"python -m serve {' '.join(args.server_arg)}".strip(),
        "settings": settings | {"api_key": bool(args.api_key)},
        "phases": [sequential, concurrent],
        "throughput_speedup": speedup,
    }
    print(f"{machine['cpu']}, {machine['cpu_count']} cores; load average before {load_before[0]:.1f}; {payload['server']}")
    print(table(payload["phases"]))
    print(f"concurrent / one at a time, requests/s: {speedup:.2f}x" if speedup else "no sequential answers")
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    bad = concurrent["lost"] + concurrent["wrong"] + sequential["lost"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
