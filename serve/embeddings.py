"""POST /v1/embeddings: the normalized mean of the model's final hidden states over each input."""

import base64
import struct

from fastapi import APIRouter, Request

from .engine import Row
from .protocol import EmbeddingRequest
from .serving import APIError, client_left, serving_of

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    serving = serving_of(request)
    serving.check_model(body.model)
    serving.check_supported(body)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs or len(inputs) > serving.engine.max_batch_size:
        raise APIError(400, f"input: give 1 to {serving.engine.max_batch_size} strings (--max-batch-size), got {len(inputs)}", param="input")
    encoded = [await serving.encode(text, "input" if len(inputs) == 1 else f"input[{index}]") for index, text in enumerate(inputs)]
    job = serving.submit([Row(ids, 0, 0.0, 1.0, 0) for ids in encoded], kind="embed")
    if await serving.gather(job, request) is None:
        return client_left()
    data = []
    for index, vector in enumerate(job.result):
        if body.encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    prompt_tokens = sum(len(ids) for ids in encoded)
    request.state.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
    return {"object": "list", "data": data, "model": serving.settings.model_name, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
