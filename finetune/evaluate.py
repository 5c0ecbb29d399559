"""`python -m finetune.evaluate`: answer a held-out JSONL file and score the answers.

    python -m finetune.evaluate --model demo/tiny-chatglm2 --checkpoint out/lora --data finetune/data/facts.jsonl

Each assistant message of the file (or each `summary` of content/summary pairs) is generated with
greedy `model.chat(tokenizer, query, history)` after the messages before it, and compared with the
reference. Reported, averaged over the answers and x100 as the published evaluate.sh did: BLEU-4 on
characters (nltk `sentence_bleu`, smoothing method 3) and ROUGE-1/2/L F1 on jieba words
(`rouge_chinese`); plus the share of answers that match exactly. `--output` writes every
prediction as JSONL.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from . import data as data_module

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")


def chat_turns(records):
    """[(query, history pairs, reference)] of read_records output; `chat` takes no system prompt."""
    turns = []
    for where, record_turns in records:
        for messages, answer in record_turns:
            roles = [message["role"] for message in messages]
            expected = ["user", "assistant"] * (len(messages) // 2) + ["user"]
            if roles != expected:
                raise data_module.DataError(
                    f"{where}: evaluation generates with model.chat, which needs alternating user/assistant "
                    f"messages (no system message); got roles {roles}"
                )
            history = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
            turns.append((messages[-1]["content"], history, answer))
    return turns


def scores(prediction, reference):
    """BLEU-4 and ROUGE-1/2/L F1 (x100) of one answer, segmented as the published evaluate.sh."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis_words = " ".join(jieba.cut(prediction)).split()
    reference_words = " ".join(jieba.cut(reference)).split()
    if hypothesis_words and reference_words:
        rouge = Rouge().get_scores(" ".join(hypothesis_words), " ".join(reference_words))[0]
        result = {key: rouge[key]["f"] * 100 for key in ROUGE_KEYS}
    else:
        result = {key: 0.0 for key in ROUGE_KEYS}
    result["bleu-4"] = (
        sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3) * 100
        if prediction and reference
        else 0.0
    )
    return result


def evaluate(model, tokenizer, turns, max_new_tokens):
    """(averages, predictions) for `turns` from chat_turns."""
    predictions = []
    totals = dict.fromkeys((*ROUGE_KEYS, "bleu-4", "exact"), 0.0)
    for query, history, reference in turns:
        answer, _ = model.chat(tokenizer, query, history=history, do_sample=False, max_new_tokens=max_new_tokens)
        item = scores(answer, reference)
        item["exact"] = 100.0 * (answer == reference)
        for key in totals:
            totals[key] += item[key]
        predictions.append({"query": query, "history": history, "reference": reference, "prediction": answer, **item})
    return {key: value / len(turns) for key, value in totals.items()}, predictions


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model folder (or a merged folder)")
    parser.add_argument("--checkpoint", help="what `python -m finetune` wrote: a LoRA adapter or P-Tuning v2 prefix folder")
    parser.add_argument("--data", required=True, help="held-out JSONL file (chat messages or content/summary pairs)")
    parser.add_argument("--prompt-column", default="content")
    parser.add_argument("--response-column", default="summary")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--quantize", type=int, default=0, choices=(0, 4, 8), help="quantize the base to 4/8 bits")
    parser.add_argument("--output", help="write every prediction with its scores to this JSONL file")
    parser.add_argument("--show", type=int, default=0, help="print the first N predictions beside their references")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        turns = chat_turns(data_module.read_records(args.data, args.prompt_column, args.response_column))
    except data_module.DataError as error:
        sys.exit(f"error: {error}")
    from .model import load_trained

    model, tokenizer = load_trained(args.model, args.checkpoint, quantize=args.quantize)
    started = time.monotonic()
    averages, predictions = evaluate(model, tokenizer, turns, args.max_new_tokens)
    for row in predictions[: args.show]:
        print(f"{row['query']!r}\n  reference : {row['reference']!r}\n  prediction: {row['prediction']!r}")
    if args.output:
        write_jsonl(args.output, predictions)
    summary = "  ".join(f"{key} {averages[key]:.2f}" for key in ("bleu-4", *ROUGE_KEYS, "exact"))
    print(f"{len(predictions)} answers from {args.data} in {time.monotonic() - started:.0f} s: {summary}")
    print(json.dumps({"answers": len(predictions), **{key: round(value, 4) for key, value in averages.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
