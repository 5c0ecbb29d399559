"""llama.cpp, the strongest CPU engine for this architecture, timed the way `bench.worker` times this package.

`python -m bench --peer llama.cpp --peer-gguf int4=MODEL-q4_0.gguf` runs this module once per GGUF, in a process
of its own, right after the rows of the same precision, and prints ours / llama.cpp beside them. It needs an
installed llama-cpp-python (`import llama_cpp`, with numpy, which it depends on) in the Python that runs it
(`--peer-python`, default the bench's own); it builds nothing, downloads nothing and converts nothing: the GGUF is
the user's (bench/README.md says how one was made from the bench's checkpoint).

The same protocol as ours: load (llama.cpp's defaults: the file memory-mapped; on AVX-512/AVX2 builds q4_0
tensors are repacked at load into an anonymous copy), a first generate of WARMUP_PROMPT_LENGTH random tokens and
WARMUP_NEW_TOKENS new ones, timed apart with its page faults, then per run: each decode batch's random prompts
(prefill length first) evaluated in one batch, the greedy pick of each sequence's next token from its logits
(argmax, no sampler, no end token), then new - 1 single-token steps for every sequence at once; prefill is the
time to the first token at batch 1, decode the tokens after the first over their time. Every run starts from an
empty KV cache. No torch is imported here: the memory figures come from `bench.system`'s /proc readers.
"""

import argparse
import ctypes
import json
import random
import sys
import time

from .protocol import (
    FIRST_ORDINARY_TOKEN,
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

# Bytes per weight of the token embedding by llama.cpp file type (llama_ftype): its quantizer stores the embedding
# in the file's type (q4_0 / q8_0 blocks of 32 weights with one float16 scale: 18 and 34 bytes). A decode step reads
# one row of it, so the roofline leaves the rest out.
EMBEDDING_BYTES_PER_WEIGHT = {1: 2.0, 2: 18 / 32, 7: 34 / 32, 32: 2.0}  # F16, Q4_0, Q8_0, BF16
FILE_TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 7: "q8_0", 32: "bf16"}


def import_llama_cpp():
    try:
        import llama_cpp
        import numpy
    except ImportError as error:
        sys.exit(
            f"bench --peer llama.cpp: {sys.executable} cannot import llama_cpp ({error}); install llama-cpp-python "
            "there, or pass --peer-python a Python that has it"
        )
    return llama_cpp, numpy


class LlamaCpp:
    """One llama.cpp model and context: prompts of up to `sequences` sequences in one batch, greedy steps after them."""

    def __init__(self, path, threads, sequences, tokens_per_sequence):
        self.api, self.numpy = import_llama_cpp()
        api = self.api
        # Its log lines (one per tensor at load) would bury the bench's own; keep the callback alive.
        self._log = api.llama_log_callback(lambda level, text, data: None)
        api.llama_log_set(self._log, ctypes.c_void_p())
        api.llama_backend_init()
        self.model = api.llama_model_load_from_file(str(path).encode(), api.llama_model_default_params())
        if not self.model:
            sys.exit(f"bench --peer llama.cpp: llama.cpp could not load {path}")
        params = api.llama_context_default_params()
        # Each sequence gets n_ctx / n_seq_max cells of the cache; a batch of prompts goes in one llama_decode.
        params.n_ctx = sequences * tokens_per_sequence
        params.n_batch = params.n_ctx
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        self.context = api.llama_init_from_model(self.model, params)
        if not self.context:
            sys.exit(f"bench --peer llama.cpp: llama.cpp could not make a context of {params.n_ctx} tokens for {path}")
        self.vocab_size = api.llama_vocab_n_tokens(api.llama_model_get_vocab(self.model))
        self.batch = api.llama_batch_init(params.n_ctx, 0, 1)
        self.capacity = params.n_ctx

    def describe(self):
        api = self.api
        description = ctypes.create_string_buffer(256)
        api.llama_model_desc(self.model, description, len(description))
        file_type = api.llama_model_ftype(self.model)
        size = api.llama_model_size(self.model)
        embedding = api.llama_model_n_embd(self.model) * self.vocab_size * EMBEDDING_BYTES_PER_WEIGHT.get(file_type, 0)
        return {
            "engine": "llama.cpp",
            "llama_cpp_python": getattr(api, "__version__", None),
            "model": description.value.decode(errors="replace"),
            "file_type": FILE_TYPE_NAMES.get(file_type, str(file_type)),
            "system_info": api.llama_print_system_info().decode(errors="replace").strip(),
            "model_bytes": size,
            # The weights a decode step reads whole (all but the embedding, of which it reads a row per token).
            "weight_bytes_but_embedding": int(size - embedding) if embedding else None,
        }

    def clear(self):
        self.api.llama_memory_clear(self.api.llama_get_memory(self.context), True)

    def step(self, sequences, positions):
        """Evaluate each sequence's new tokens (`sequences[s]`, from position `positions[s]`), all in one batch;
        returns each sequence's greedy next token, from the logits of its last token."""
        api, batch = self.api, self.batch
        count = sum(map(len, sequences))
        if count > self.capacity:
            raise ValueError(f"{count} tokens do not fit one batch of {self.capacity}")
        index, last = 0, []
        for sequence, (tokens, start) in enumerate(zip(sequences, positions)):
            for offset, token in enumerate(tokens):
                batch.token[index] = token
                batch.pos[index] = start + offset
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = sequence
                batch.logits[index] = offset == len(tokens) - 1
                index += 1
            last.append(index - 1)
        batch.n_tokens = count
        status = api.llama_decode(self.context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        picks = []
        for index in last:
            logits = self.numpy.ctypeslib.as_array(api.llama_get_logits_ith(self.context, index), shape=(self.vocab_size,))
            picks.append(int(logits.argmax()))
        return picks

    def generate(self, prompts, new_tokens):
        """Greedy generation of exactly `new_tokens` tokens after each prompt (all of one length) from an empty
        cache: the time before the prompts, after the first new token, and after each step, as ours records them."""
        self.clear()
        times = [time.perf_counter()]
        tokens = self.step(prompts, [0] * len(prompts))
        times.append(time.perf_counter())
        position = len(prompts[0])
        for _ in range(new_tokens - 1):
            tokens = self.step([[token] for token in tokens], [position] * len(prompts))
            position += 1
            times.append(time.perf_counter())
        return times


def random_prompts(vocab_size, batch, length, seed):
    generator = random.Random(seed)
    return [[generator.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(length)] for _ in range(batch)]


def measure_speed(engine, args):
    """As `bench.worker.measure_speed`: the first generate and its split, then prefill and decode per run."""
    prefill = {length: [] for length in args.prefill_lengths}
    decode = {batch: [] for batch in args.batches}
    decode_prompt = args.prefill_lengths[0]
    usage_before = usage_now()
    start = time.perf_counter()
    times = engine.generate(random_prompts(engine.vocab_size, 1, WARMUP_PROMPT_LENGTH, 0), WARMUP_NEW_TOKENS)
    first_generate_seconds = time.perf_counter() - start
    first = first_generate_split(usage_before, usage_now(), times[1] - start)
    print(f"  [{args.label}] first generate: {first_generate_seconds:.1f} s (first token {first['first_token_seconds']:.2f} s; "
          f"page faults {first['major_faults']} from disk, {first['minor_faults']} in memory, {(first['storage_read_bytes'] or 0) / 1e6:.0f} MB read)", file=sys.stderr, flush=True)
    for run in range(args.runs):
        seed = run + 1
        pause_for_bandwidth(args)
        for batch in args.batches:
            times = engine.generate(random_prompts(engine.vocab_size, batch, decode_prompt, seed), args.new_tokens)
            decode[batch].append((args.new_tokens - 1) * batch / (times[-1] - times[1]))
            if batch == 1:
                prefill[decode_prompt].append(decode_prompt / (times[1] - times[0]))
            print(f"  [{args.label}] run {run + 1}/{args.runs} batch {batch}: decode {decode[batch][-1]:.3g} tok/s",
                  file=sys.stderr, flush=True)
        for length in args.prefill_lengths[1:]:
            times = engine.generate(random_prompts(engine.vocab_size, 1, length, seed), 1)
            prefill[length].append(length / (times[1] - times[0]))
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


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.llama_cpp_peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="the GGUF file to time")
    parser.add_argument("--label", required=True, help="name of this row in progress lines")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prefill-lengths", type=lambda text: [int(v) for v in text.split(",")], required=True)
    parser.add_argument("--batches", type=lambda text: [int(v) for v in text.split(",")], required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--output", required=True, help="where to write the JSON result")
    parser.add_argument("--bandwidth-pauses", action="store_true", help="pause for a bandwidth reading before each run and after the last")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import_llama_cpp()  # before anything else: a missing llama_cpp is the one line the caller shows
    others = OtherProcessesMeter()
    anonymous = AnonymousPeakSampler().start()
    result = {"threads": args.threads, "device": "cpu"}
    print(f"  [{args.label}] loading {args.gguf}", file=sys.stderr, flush=True)
    longest = max(args.prefill_lengths + [args.prefill_lengths[0] + args.new_tokens, WARMUP_PROMPT_LENGTH + WARMUP_NEW_TOKENS])
    start = time.perf_counter()
    engine = LlamaCpp(args.gguf, args.threads, max(args.batches), -(-longest // 256) * 256)
    load_seconds = time.perf_counter() - start
    described = engine.describe()
    result.update(
        peer=described,
        dtype=described["file_type"],
        load_seconds=load_seconds,
        model_bytes=described["model_bytes"],
        **memory_after_load(anonymous),
    )
    print(f"  [{args.label}] loaded in {load_seconds:.1f} s, RSS {result['rss_after_load_bytes'] / 1e9:.2f} GB "
          f"({described['model']}; {described['system_info']})", file=sys.stderr, flush=True)
    peak_reset = reset_peak_rss()
    result["first_generate_seconds"], result["first_generate"], result["prefill"], result["decode"] = measure_speed(engine, args)
    result.update(memory_after_runs(anonymous, peak_reset))
    finish(result, anonymous, others)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
