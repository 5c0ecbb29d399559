"""What the server serves and how it is doing: GET /v1/models, /v1/models/{name}, /health, and
/metrics in the Prometheus text format."""

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from .serving import serving_of

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [serving_of(request).model_card()]}


@router.get("/v1/models/{name}")
async def model(name: str, request: Request):
    serving = serving_of(request)
    serving.check_model(name)
    return serving.model_card()


@router.get("/health")
async def health(request: Request):
    serving = serving_of(request)
    return {"status": "ok", "model": serving.settings.model_name, **serving.engine.stats()}


@router.get("/metrics")
async def metrics(request: Request):
    serving = serving_of(request)
    text = prometheus_text(serving.engine.stats(), serving.engine.histograms(), serving.responses)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def prometheus_text(stats, histograms, responses):
    """The Prometheus text exposition (version 0.0.4) of the engine's `stats()` and `histograms()` and
    the HTTP responses counted by the Gate."""
    lines = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}" for labels, value in samples)

    metric("serve_http_responses_total", "counter", "HTTP responses by path and status.", [
        (f'{{path="{path}",status="{code}"}}', count) for (path, code), count in sorted(responses.items(), key=str)
    ])  # fmt: skip
    for name, key, kind, help_text in (
        ("serve_requests_total", "requests", "counter", "Generation and embedding requests admitted to the engine."),
        ("serve_prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens read (prefilled)."),
        ("serve_generation_tokens_total", "generated_tokens", "counter", "Tokens generated, end-of-answer tokens included."),
        ("serve_cancelled_rows_total", "cancelled_rows", "counter", "Rows dropped because their client went away."),
        ("serve_steps_total", "steps", "counter", "Engine steps (prefill chunks and decoding steps)."),
        ("serve_queue_depth", "waiting", "gauge", "Requests waiting to be admitted."),
        ("serve_running_rows", "running_rows", "gauge", "Rows being prefilled or decoded."),
        ("serve_prefilling_rows", "prefilling_rows", "gauge", "Rows whose prompt is being read."),
        ("serve_decoding_rows", "decoding_rows", "gauge", "Rows in the decoding batch."),
    ):
        metric(name, kind, help_text, [("", stats[key])])
    for name, key, help_text in (
        ("serve_time_to_first_token_seconds", "ttft_seconds", "From a request's submission to its first token."),
        ("serve_time_per_output_token_seconds", "time_per_output_token_seconds", "Between two tokens of a row."),
    ):
        histogram = histograms[key]
        buckets = [(f'{{le="{"+Inf" if bound == float("inf") else f"{bound:g}"}"}}', count) for bound, count in histogram["buckets"]]
        metric(name, "histogram", help_text, [])
        lines.extend(f"{name}_bucket{labels} {count}" for labels, count in buckets)
        lines.extend([f"{name}_sum {histogram['sum']:.6f}", f"{name}_count {histogram['count']}"])
    return "\n".join(lines) + "\n"
