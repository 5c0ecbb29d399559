"""Train the bundled demo model `demo/tiny-chatglm2` from the dialogs in `demo/data/dialogs.jsonl`.

1. A SentencePiece tokenizer (BPE, byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2, text kept as written)
   is trained on the dialog text.
2. The model folder gets a config with tiny ChatGLM2 shapes, the tokenizer, and RELATIVE SYMLINKS to
   the repository's code files, so the demo runs the one implementation at the repository root.
3. The model is built from that folder the way users load it (`AutoModel` with trust_remote_code)
   and trained with AdamW on every turn, encoded exactly as `chat` encodes it: `[gMASK] sop` +
   `tokenizer.build_prompt(query, history)`, then the response and `</s>`; only the response and
   `</s>` are scored. Each epoch puts most dialogs after one or two unrelated single-turn dialogs
   drawn afresh, so that answers hold up after whatever the user said before.
4. The weights are saved as `model.safetensors`, then every training turn is replayed through
   `model.chat` in greedy mode, as written and after a fixed draw of unrelated opening turns, and
   the share of exact answers is printed.

    python demo/train_tiny_model.py                          # rebuilds demo/tiny-chatglm2
    python demo/train_tiny_model.py --quick --output /tmp/x  # a few steps: checks that the script works
"""

import argparse
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file
from tqdm import tqdm

DEMO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO_DIR.parent))

from tools.model_folder import MODEL_MODULES, PACKAGE_JSON_FILES, REPO_ROOT, replace_file  # noqa: E402

DEFAULT_DATA = DEMO_DIR / "data" / "dialogs.jsonl"
DEFAULT_OUTPUT = DEMO_DIR / "tiny-chatglm2"

# ChatGLM2-6B's architecture (multi-query attention with 2 groups, half-rotary, SwiGLU, RMSNorm, QKV
# bias) at a size that memorises a few hundred turns in minutes on 2 CPU cores and stays under 10 MB.
TINY_SHAPES = {
    "num_layers": 4,
    "hidden_size": 160,
    "ffn_hidden_size": 432,
    "kv_channels": 40,
    "num_attention_heads": 4,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "seq_length": 1024,
    "torch_dtype": "float32",
}
SENTENCEPIECE_PIECES = 2000
# The model's vocabulary rows: the tokenizer's ids rounded up to a multiple of 64 (the release pads
# its 64,794 ids to 65,024 rows).
VOCAB_ROW_MULTIPLE = 64
GLM_SPECIAL_TOKEN_COUNT = 5
EOS_ID = 2
IGNORE_INDEX = -100
WARMUP_STEPS = 30
QUICK_STEPS = 3
# How many unrelated single-turn dialogs go before a dialog in training (see with_unrelated_openings).
OPENING_COUNTS = (0, 1, 2)
OPENING_WEIGHTS = (0.4, 0.4, 0.2)
EVAL_SEED = 1234
QUICK_EVAL_DIALOGS = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dialog set, one JSON list of [query, response] turns per line")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="model folder to (re)write")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"train {QUICK_STEPS} steps and check {QUICK_EVAL_DIALOGS} dialogs: proves the script runs, not a usable model",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_dialogs(path):
    """Dialogs as lists of (query, response); refuses malformed lines and contradictory answers."""
    dialogs = []
    answers = {}  # (history, query) -> (response, line): greedy decoding can give only one answer per prompt
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(record, list) or not record:
            raise ValueError(f"{where}: expected a non-empty list of [query, response] turns")
        turns = []
        for turn in record:
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(text, str) and text.strip() for text in turn)):
                raise ValueError(f"{where}: each turn must be [query, response], two non-empty strings; got {turn!r}")
            query, response = turn
            if response != response.strip():
                raise ValueError(f"{where}: response {response!r} has surrounding whitespace, which chat strips")
            key = (tuple(turns), query)
            if key in answers and answers[key][0] != response:
                raise ValueError(
                    f"{where}: {query!r} after the same history already has the answer {answers[key][0]!r} "
                    f"(line {answers[key][1]}); greedy decoding can only learn one"
                )
            answers[key] = (response, line_number)
            turns.append((query, response))
        dialogs.append(turns)
    if not dialogs:
        raise ValueError(f"{path}: no dialogs")
    check_openings_agree(dialogs, path)
    return dialogs


def check_openings_agree(dialogs, path):
    """Refuse a follow-up that training's openings (see with_unrelated_openings) would contradict.

    When a dialog's earlier turns are all single-turn dialogs, an opening can build the same prompt
    with the follow-up as a dialog's first query; both must then have the same answer.
    """
    single_turns = {dialog[0] for dialog in dialogs if len(dialog) == 1}
    first_answers = {dialog[0][0]: dialog[0][1] for dialog in dialogs}
    for dialog in dialogs:
        for index, (query, response) in enumerate(dialog[1:], start=1):
            first_answer = first_answers.get(query, response)
            if first_answer != response and all(turn in single_turns for turn in dialog[:index]):
                raise ValueError(
                    f"{path}: {query!r} is answered {response!r} after {[q for q, _ in dialog[:index]]} but "
                    f"{first_answer!r} as a first turn; training puts single-turn dialogs before others, "
                    "so these prompts coincide"
                )


def train_sentencepiece(dialogs, pieces):
    """Serialized SentencePiece model trained on the dialog text and the chat prompt's own words."""
    # SentencePiece reads one sentence per item and cannot learn newlines (they fall back to bytes,
    # as in the release); the prompt's fixed words are listed per turn so that they get pieces.
    sentences = []
    for dialog in dialogs:
        for number, (query, response) in enumerate(dialog, start=1):
            sentences += [f"[Round {number}]", f"问：{query}", f"答：{response}"]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=pieces,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=EOS_ID,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_model_folder(output, tokenizer_model, pieces):
    """Config, tokenizer files and code links; everything but the weights."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "tokenizer.model").write_bytes(tokenizer_model)
    for name in MODEL_MODULES:
        link = output / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(REPO_ROOT / name, output))
    # Copies, not links: they are data a user may edit or re-save, not implementation.
    for name in PACKAGE_JSON_FILES:
        replace_file(REPO_ROOT / name, output / name)
    config = json.loads((REPO_ROOT / "config.json").read_text(encoding="utf-8"))
    token_ids = pieces + GLM_SPECIAL_TOKEN_COUNT
    config.update(TINY_SHAPES, padded_vocab_size=-(-token_ids // VOCAB_ROW_MULTIPLE) * VOCAB_ROW_MULTIPLE)
    (output / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def with_unrelated_openings(dialogs, rng):
    """Each dialog once, most of them after 1 or 2 single-turn dialogs drawn at random.

    A memorised answer should not depend on what came before unless the dialog says so: in the
    terminal people greet first and ask next. Openings are single-turn dialogs only, because none
    of those sets up anything a later answer depends on (a name, a city).
    """
    openings = [dialog for dialog in dialogs if len(dialog) == 1]
    conversations = []
    for dialog in dialogs:
        count = min(rng.choices(OPENING_COUNTS, weights=OPENING_WEIGHTS)[0], len(openings))
        opening = [turn for other in rng.sample(openings, count) if other is not dialog for turn in other]
        conversations.append((opening, dialog))
    return conversations


def build_examples(tokenizer, conversations):
    """(prompt ids, response ids + eos) for every turn of each dialog, after its opening turns,
    encoded as `chat` and ChatGLM2's fine-tuning encode them."""
    examples = []
    for opening, dialog in conversations:
        for index, (query, response) in enumerate(dialog):
            history = opening + dialog[:index]
            prompt_ids = tokenizer(tokenizer.build_prompt(query, history))["input_ids"]
            response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
            examples.append((prompt_ids, response_ids))
    return examples


def shuffled_batches(examples, batch_size, rng):
    """Batches of similar length (little padding), in random order; lengths are jittered each epoch."""
    order = sorted(range(len(examples)), key=lambda i: sum(map(len, examples[i])) + rng.uniform(0, 8))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(tokenizer, examples, indices):
    """Left-padded input_ids/attention_mask/position_ids from the tokenizer, labels on the responses only."""
    sequences = [examples[i][0] + examples[i][1] for i in indices]
    batch = tokenizer.pad({"input_ids": sequences}, padding=True, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(indices):
        response_ids = examples[i][1]
        labels[row, width - len(response_ids) :] = torch.tensor(response_ids)
    return {**batch, "labels": labels}


def train(model, tokenizer, dialogs, args):
    rng = random.Random(args.seed)
    turns = sum(map(len, dialogs))
    steps_per_epoch = math.ceil(turns / args.batch_size)
    total_steps = QUICK_STEPS if args.quick else args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def learning_rate_factor(step):
        warmup = min(1.0, (step + 1) / WARMUP_STEPS)
        return warmup * 0.5 * (1 + math.cos(math.pi * step / total_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    model.train()
    step = 0
    with tqdm(total=total_steps, desc="training", unit="step", dynamic_ncols=True) as progress:
        while step < total_steps:
            examples = build_examples(tokenizer, with_unrelated_openings(dialogs, rng))
            for indices in shuffled_batches(examples, args.batch_size, rng):
                if step == total_steps:
                    break
                loss = model(**collate(tokenizer, examples, indices), use_cache=False).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                progress.update()
                progress.set_postfix(epoch=1 + (step - 1) // steps_per_epoch, loss=f"{loss.item():.4f}")
    model.eval()


def save_weights(model, output):
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, output / "model.safetensors", metadata={"format": "pt"})


def evaluate(model, tokenizer, conversations, label):
    """Share of turns that greedy `model.chat` answers exactly: (first turns right, total), (follow-ups right, total).

    A dialog's first turn counts as a first turn even after an opening: it does not depend on it.
    """
    first_turns = [0, 0]
    follow_ups = [0, 0]
    mismatches = []
    turn_count = sum(len(dialog) for _, dialog in conversations)
    with tqdm(total=turn_count, desc=f"checking {label}", unit="turn", dynamic_ncols=True) as progress:
        for opening, dialog in conversations:
            for index, (query, expected) in enumerate(dialog):
                history = opening + dialog[:index]
                # An answer longer than the expected one is wrong anyway: no need to generate further.
                limit = len(tokenizer.encode(expected, add_special_tokens=False)) + 2
                answer, _ = model.chat(tokenizer, query, history=history, do_sample=False, max_new_tokens=limit)
                tally = follow_ups if index else first_turns
                tally[0] += answer == expected
                tally[1] += 1
                if answer != expected:
                    mismatches.append((query, len(history), expected, answer))
                progress.update()
    for query, earlier, expected, answer in mismatches:
        print(f"  mismatch after {earlier} turn(s): {query!r}\n    expected {expected!r}\n    got      {answer!r}")
    return tuple(first_turns), tuple(follow_ups)


def report(label, scores):
    (first_right, first_total), (follow_right, follow_total) = scores
    print(f"greedy chat exact, {label}: first turns {first_right}/{first_total}, follow-ups {follow_right}/{follow_total}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.monotonic()
    try:
        dialogs = load_dialogs(args.data)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    output = args.output.resolve()
    print(f"{len(dialogs)} dialogs, {sum(map(len, dialogs))} turns from {args.data}")

    write_model_folder(output, train_sentencepiece(dialogs, SENTENCEPIECE_PIECES), SENTENCEPIECE_PIECES)
    # Imported late: transformers is slow to import and not needed to validate the arguments and data.
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output, trust_remote_code=True)
    config = AutoConfig.from_pretrained(output, trust_remote_code=True)
    model = AutoModel.from_config(config, trust_remote_code=True)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"tokenizer: {len(tokenizer)} ids; model: {parameters / 1e6:.2f} M parameters")

    train(model, tokenizer, dialogs, args)
    save_weights(model, output)
    trained = time.monotonic()
    checked = dialogs[:QUICK_EVAL_DIALOGS] if args.quick else dialogs
    as_trained = evaluate(model, tokenizer, [([], dialog) for dialog in checked], "as written")
    # A fixed draw, so that the figure can be compared between runs.
    after_opening = evaluate(model, tokenizer, with_unrelated_openings(checked, random.Random(EVAL_SEED)), "after openings")
    size_mb = (output / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {output} (model.safetensors: {size_mb:.1f} MB)")
    print(f"training took {trained - started:.0f} s, checking {time.monotonic() - trained:.0f} s")
    report("dialogs as written", as_trained)
    report("after 0-2 unrelated opening turns", after_opening)


if __name__ == "__main__":
    main()
