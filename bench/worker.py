"""One precision in one process: load the model folder as a user does, then time prefill and decode.

The orchestrator (`python -m bench`) runs each precision through this module in a subprocess of its
own, so resident and peak memory are that precision's alone. The result goes to `--output` as JSON.
Speed is measured through `model.generate` with a streamer that timestamps every token: the prompt is
handed to the streamer before prefill, each new token after its step, so time to the first token is
the prefill and the tokens after it are the decode.
"""

import argparse
import gc
import json
import sys
import time

import torch
from transformers import AutoModel
from transformers.generation.streamers import BaseStreamer

from .protocol import (
    FIRST_ORDINARY_TOKEN,
    BANDWIDTH_PAUSE,
    WARMUP_NEW_TOKENS,
    WARMUP_PROMPT_LENGTH,
    finish,
    first_generate_split,
    memory_after_load,
    memory_after_runs,
    pause_for_bandwidth,
    usage_now,
)
from .system import AnonymousPeakSampler, OtherProcessesMeter, reset_peak_rss, summary

LONG_CONVERSATION_TOKENS = 8192
LONG_CONVERSATION_CHUNK = 512
ENCODE_TOKENS = 2048  # spec §7 quotes memory "to encode 2048 tokens" and "to decode 8192"
SMALL_GPU_BYTES = 6 * 2**30


def log(message):
    print(message, file=sys.stderr, flush=True)


class TokenClock(BaseStreamer):
    """Timestamps of generate's streamer calls: once for the prompt, then once per new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def random_prompt(vocab_size, batch, length, seed, device):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_TOKEN, vocab_size, (batch, length), generator=generator).to(device)


def generate_exactly(model, input_ids, new_tokens, streamer):
    """Greedy `generate` of exactly `new_tokens` tokens, reporting to `streamer`.

    No eos token, so nothing stops it early: `min_new_tokens` would do the same through two logits
    processors that scan the 65024-token vocabulary at every step (about 1 ms of a 6B step), a cost
    of the harness that no chat pays.
    """
    model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        eos_token_id=None,
        do_sample=False,
        streamer=streamer,
    )


def timed_generate(model, input_ids, new_tokens):
    """(prefill seconds, decode tokens/s over the tokens after the first, or None for one new token)."""
    clock = TokenClock()
    generate_exactly(model, input_ids, new_tokens, clock)
    if len(clock.times) != new_tokens + 1:
        raise RuntimeError(f"generate streamed {len(clock.times) - 1} new tokens, expected {new_tokens}")
    prefill_seconds = clock.times[1] - clock.times[0]
    if new_tokens == 1:
        return prefill_seconds, None
    decoded = (new_tokens - 1) * input_ids.shape[0]
    return prefill_seconds, decoded / (clock.times[-1] - clock.times[1])


def load_model(args, dtype):
    """`AutoModel.from_pretrained(folder, trust_remote_code=True)` (then `.quantize(bits)`), timed."""
    start = time.perf_counter()
    chosen = {"quantization_cpu_kernel": args.cpu_kernel} if args.cpu_kernel else {}
    model = AutoModel.from_pretrained(args.folder, trust_remote_code=True, dtype=dtype, **chosen)
    if args.quantize_bits:
        model = model.quantize(args.quantize_bits, device=args.device if args.device == "cuda" else None)
    if args.output_layer_bits:
        model = model.quantize(model.config.quantization_bit, output_layer_bits=args.output_layer_bits)
    model = model.to(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return model.eval(), seconds


def model_bytes(model):
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def measure_speed(model, args, vocab_size):
    """First-generate seconds and their split (`first_generate_split`), then prefill tokens/s per prompt length and
    decode tokens/s per batch (`args.runs` each)."""
    prefill = {length: [] for length in args.prefill_lengths}
    decode = {batch: [] for batch in args.batches}
    decode_prompt = args.prefill_lengths[0]
    # The first call pays one-time work (kernel setup; CPU int4 layers convert their weights; the first
    # touch of each mapped checkpoint page): timed apart, since a user waits for it too, and kept out of the runs.
    usage_before = usage_now()
    start = time.perf_counter()
    clock = TokenClock()
    generate_exactly(model, random_prompt(vocab_size, 1, WARMUP_PROMPT_LENGTH, 0, args.device), WARMUP_NEW_TOKENS, clock)
    first_generate_seconds = time.perf_counter() - start
    first = first_generate_split(usage_before, usage_now(), clock.times[1] - start)
    log(
        f"  [{args.label}] first generate: {first_generate_seconds:.1f} s (first token {first['first_token_seconds']:.2f} s; "
        f"page faults {first['major_faults']} from disk, {first['minor_faults']} in memory, {(first['storage_read_bytes'] or 0) / 1e6:.0f} MB read; "
        f"CPU {first['user_seconds']:.2f} s user, {first['system_seconds']:.2f} s system)"
    )
    for run in range(args.runs):
        seed = run + 1
        pause_for_bandwidth(args)
        for batch in args.batches:
            prompt = random_prompt(vocab_size, batch, decode_prompt, seed, args.device)
            prefill_seconds, tokens_per_second = timed_generate(model, prompt, args.new_tokens)
            decode[batch].append(tokens_per_second)
            if batch == 1:
                prefill[decode_prompt].append(decode_prompt / prefill_seconds)
            log(f"  [{args.label}] run {run + 1}/{args.runs} batch {batch}: decode {tokens_per_second:.3g} tok/s")
        for length in args.prefill_lengths[1:]:
            prefill_seconds, _ = timed_generate(model, random_prompt(vocab_size, 1, length, seed, args.device), 1)
            prefill[length].append(length / prefill_seconds)
        log(f"  [{args.label}] run {run + 1}/{args.runs} prefill: " + ", ".join(
            f"{length} tokens {values[-1]:.3g} tok/s" for length, values in prefill.items()
        ))
    pause_for_bandwidth(args)
    return (
        first_generate_seconds,
        first,
        {str(length): {"tokens_per_second": summary(values)} for length, values in prefill.items()},
        {
            f"batch{batch}": {"tokens_per_second": summary(values), "prompt_tokens": decode_prompt, "new_tokens": args.new_tokens}
            for batch, values in decode.items()
        },
    )


def measure_long_conversation(model, vocab_size, device):
    """Peak CUDA memory to encode 2048 tokens at once, and to hold an 8192-token conversation.

    The conversation is built as a chat builds it, a chunk of new tokens at a time on top of the
    cache, and ends with single-token decode steps up to 8192 tokens of context.
    """
    from transformers import DynamicCache

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model(input_ids=random_prompt(vocab_size, 1, ENCODE_TOKENS, 0, device), use_cache=True, logits_to_keep=1)
    encode_peak = torch.cuda.max_memory_reserved()

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache()
    decode_steps = 16
    context = 0
    while context < LONG_CONVERSATION_TOKENS - decode_steps:
        chunk = min(LONG_CONVERSATION_CHUNK, LONG_CONVERSATION_TOKENS - decode_steps - context)
        model(input_ids=random_prompt(vocab_size, 1, chunk, context, device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        context += chunk
    for step in range(decode_steps):
        model(input_ids=random_prompt(vocab_size, 1, 1, step, device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        context += 1
    conversation_peak = torch.cuda.max_memory_reserved()
    return {
        "encode_2048_peak_reserved_bytes": encode_peak,
        "conversation_8192_peak_reserved_bytes": conversation_peak,
        "conversation_tokens": context,
        "fits_6_gib": conversation_peak <= SMALL_GPU_BYTES,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", required=True, help="model folder: code files, config.json and weights")
    parser.add_argument("--label", required=True, help="name of this configuration in progress lines")
    parser.add_argument("--quantize-bits", type=int, default=0, help="call model.quantize(bits) after loading")
    parser.add_argument("--output-layer-bits", type=int, default=0, help="then quantize output_layer to these bits")
    parser.add_argument("--cpu-kernel", help="the CPU kernel, chosen at load (from_pretrained(..., quantization_cpu_kernel=...))")
    parser.add_argument("--dtype", default="bfloat16", help="torch dtype name, or auto: the checkpoint's (config torch_dtype)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prefill-lengths", type=lambda text: [int(v) for v in text.split(",")], required=True)
    parser.add_argument("--batches", type=lambda text: [int(v) for v in text.split(",")], required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--load-only", action="store_true", help="measure loading and memory, not speed")
    parser.add_argument("--long-conversation", action="store_true", help="CUDA: the 2048/8192-token memory check")
    parser.add_argument("--output", required=True, help="where to write the JSON result")
    parser.add_argument("--bandwidth-pauses", action="store_true", help=f"print {BANDWIDTH_PAUSE!r} before each run and "
                        "after the last, then wait for a line on stdin (python -m bench reads the bandwidth meanwhile)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    # Other processes on the machine slow every number here: record how much CPU they took meanwhile.
    others = OtherProcessesMeter()
    anonymous = AnonymousPeakSampler().start()
    result = {"threads": args.threads, "device": args.device}

    log(f"  [{args.label}] loading {args.folder}")
    # Loaded outside any inference/no-grad context, as users load; `generate` itself runs without grad.
    model, load_seconds = load_model(args, dtype)
    gc.collect()
    vocab_size = min(model.config.padded_vocab_size, model.get_input_embeddings().num_embeddings)
    result.update(
        dtype=str(model.dtype).removeprefix("torch."),
        load_seconds=load_seconds,
        model_bytes=model_bytes(model),
        **memory_after_load(anonymous),
    )
    log(f"  [{args.label}] loaded in {load_seconds:.1f} s, RSS {result['rss_after_load_bytes'] / 1e9:.2f} GB")
    if args.device == "cuda":
        result["cuda_allocated_after_load_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    peak_reset = reset_peak_rss()
    if not args.load_only:
        result["first_generate_seconds"], result["first_generate"], result["prefill"], result["decode"] = measure_speed(
            model, args, vocab_size
        )
        if args.device == "cuda":
            result["cuda_peak_run_bytes"] = torch.cuda.max_memory_allocated()
        if args.long_conversation:
            with torch.no_grad():
                result["long_conversation"] = measure_long_conversation(model, vocab_size, args.device)
        result.update(memory_after_runs(anonymous, peak_reset))
    finish(result, anonymous, others)

    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
