"""End to end, as finetune/README.md runs it: the demo model learns 30 new facts with LoRA and still
greets as before; P-Tuning v2 trains its prefix over the same data and keeps the greetings.

Greedy `model.chat` must give every new answer exactly, and every greeting of the demo's own training
set (finetune/data/greetings.jsonl, mixed into the fine-tuning data as the README explains)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from finetune.model import load_trained  # noqa: E402

DEMO = REPO_ROOT / "demo" / "tiny-chatglm2"
FACTS = REPO_ROOT / "finetune" / "data" / "facts.jsonl"
GREETINGS = REPO_ROOT / "finetune" / "data" / "greetings.jsonl"
# The README's commands, less the output folder.
LORA = (
    "--method lora --lora-target query_key_value,dense,dense_h_to_4h,dense_4h_to_h --lora-rank 16 "
    "--lora-dropout 0 --num-train-epochs 60 --per-device-train-batch-size 8 --learning-rate 1e-2"
)
PTUNING = "--method ptuning --pre-seq-len 64 --max-steps 100 --per-device-train-batch-size 8 --learning-rate 5e-2"


def pairs(path, limit=None):
    rows = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()[:limit]]
    return [(messages[0]["content"], messages[1]["content"]) for messages in rows]


def finetune(output_dir, method_arguments, *train_files):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "finetune", "--model", str(DEMO), "--train-file", *map(str, train_files),
        *method_arguments.split(), "--output-dir", str(output_dir), "--save-strategy", "no",
        "--logging-steps", "10", "--disable-tqdm", "True",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def wrong_answers(model, tokenizer, expected_pairs):
    wrong = []
    for query, answer in expected_pairs:
        reply, _ = model.chat(tokenizer, query, history=[], do_sample=False, max_new_tokens=48)
        if reply != answer:
            wrong.append((query, answer, reply))
    return wrong


@pytest.mark.slow
def test_lora_learns_thirty_new_facts_and_keeps_the_greetings(tmp_path):
    model, tokenizer = load_trained(DEMO)
    assert len(wrong_answers(model, tokenizer, pairs(FACTS))) == 30  # the demo model knows none of them
    losses = finetune(tmp_path / "lora", LORA, FACTS, GREETINGS)
    assert losses[-1] < 0.3 < losses[0]
    model, tokenizer = load_trained(DEMO, tmp_path / "lora")
    assert wrong_answers(model, tokenizer, pairs(FACTS)) == []
    assert wrong_answers(model, tokenizer, pairs(GREETINGS)) == []


@pytest.mark.slow
def test_ptuning_trains_the_prefix_and_keeps_the_greetings(tmp_path):
    facts = tmp_path / "facts8.jsonl"
    facts.write_text("".join(FACTS.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    losses = finetune(tmp_path / "ptuning", PTUNING, facts, GREETINGS)
    assert losses[-1] < 0.5 * losses[0], losses
    model, tokenizer = load_trained(DEMO, tmp_path / "ptuning")
    assert wrong_answers(model, tokenizer, pairs(GREETINGS)) == []
