"""POST /v1/completions: text completion of prompts given as text or as token ids, with `echo` and
the legacy `logprobs` a harness scores choices with."""

import time
import uuid

from fastapi import APIRouter, Request

from .logprobs import CompletionChoices
from .protocol import CompletionRequest
from .serving import APIError, client_left, serving_of

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    serving = serving_of(request)
    model_name = serving.settings.model_name
    serving.check_model(body.model)
    serving.check_supported(body)
    # A prompt is a string or token ids (as harnesses send them: used as given, no prefix added).
    single = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
    prompts = [body.prompt] if single else body.prompt
    if not prompts:
        raise APIError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
    encoded = []
    for index, prompt in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
        encoded.append(await serving.encode(prompt, name) if isinstance(prompt, str) else serving.check_length(serving.token_ids(prompt, name), name))
    job = serving.submit(serving.rows_for(body, encoded, body.max_tokens, "max_tokens", continues_prompt=True))
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(ids) for ids in encoded)
    prompt_texts = [prompt if isinstance(prompt, str) else serving.tokenizer.decode(prompt) for prompt in prompts]
    from_text = [isinstance(prompt, str) for prompt in prompts]
    shown = CompletionChoices(serving.text_of, serving.tokenizer, job.rows, prompt_texts, from_text, body.n, body.echo)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index, text=None, finish_reason=None, logprobs=()):
            payload = {"id": completion_id, "object": "text_completion", "created": created, "model": model_name, "choices": []}
            if index is not None:
                text, logprobs = shown.streamed(index, text, logprobs)
                payload["choices"] = [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]
            if include_usage:
                payload["usage"] = None
            return payload

        return serving.stream(job, request, prompt_tokens, include_usage, chunk, [])
    texts = await serving.gather(job, request)
    if texts is None:
        return client_left()
    choices = []
    for index, (row, text) in enumerate(zip(job.rows, texts)):
        text, logprobs = shown.whole(index, text)
        choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": row.finish_reason})
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "choices": choices,
        "usage": serving.usage_of(job, prompt_tokens, request),
    }
