"""`python -m finetune` under `torchrun --nproc_per_node 2` on the CPU (DDP over gloo), on the demo model.

Both ranks must train one model (the same trainable weights at the end), the loss must fall, what rank 0
saved must load and answer, and the run must give the loss curve of one process with twice the gradient
accumulation (the same examples per optimizer step, the same token-weighted loss)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from finetune.model import load_trained  # noqa: E402
from finetune_rank_driver import digest  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "finetune_rank_driver.py"
DEMO = REPO_ROOT / "demo" / "tiny-chatglm2"
FACTS = REPO_ROOT / "finetune" / "data" / "facts.jsonl"
STEPS = 6
COMMON = [
    "--model", str(DEMO), "--train-file", str(FACTS), "--method", "lora", "--lora-rank", "8",
    "--lora-target", "query_key_value,dense_h_to_4h,dense_4h_to_h", "--lora-dropout", "0",
    "--max-steps", str(STEPS), "--learning-rate", "1e-2", "--logging-steps", "1", "--save-strategy", "no",
    "--seed", "0", "--disable-tqdm", "True", "--per-device-train-batch-size", "2",
]


def launch(command, output_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    result = subprocess.run(
        [*command, str(DRIVER), *COMMON, "--output-dir", str(output_dir), *extra],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(output_dir.glob("rank-*.json"))]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    return ranks, losses


@pytest.mark.slow
def test_two_cpu_processes_train_one_model_like_one_process_with_twice_the_accumulation(tmp_path):
    ranks, ddp_losses = launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        tmp_path / "ddp",
    )
    assert [(r["rank"], r["world_size"], r["parallel_mode"]) for r in ranks] == [
        (0, 2, "ParallelMode.DISTRIBUTED"),
        (1, 2, "ParallelMode.DISTRIBUTED"),
    ]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the two replicas identical
    assert len(ddp_losses) == STEPS
    assert ddp_losses[-1] < ddp_losses[0] - 1.0, ddp_losses

    (single,), single_losses = launch([sys.executable], tmp_path / "single", "--gradient-accumulation-steps", "2")
    assert single["world_size"] == 1
    assert single_losses == pytest.approx(ddp_losses, rel=1e-3, abs=1e-3)

    model, tokenizer = load_trained(DEMO, tmp_path / "ddp")
    assert digest(model, lambda name, parameter: "lora_" in name) == ranks[0]["digest"]  # rank 0 saved what it trained
    reply, _ = model.chat(tokenizer, "小明的猫叫什么名字？", history=[], do_sample=False, max_new_tokens=16)
    assert isinstance(reply, str) and reply
