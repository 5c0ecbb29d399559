"""Test helper, run under torchrun: `python -m finetune`'s own parse and train steps, then each rank
writes what it trained (a digest of its trainable parameters) and how it ran to OUTPUT_DIR/rank-N.json,
so a test can check that every rank trained the same model and that the saved files hold it."""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.train import parse_arguments, train  # noqa: E402


def digest(model, keep=lambda name, parameter: parameter.requires_grad):
    hasher = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if keep(name, parameter):
            hasher.update(name.encode())
            hasher.update(parameter.detach().to(torch.float32).contiguous().numpy().tobytes())
    return hasher.hexdigest()


def main():
    options, training = parse_arguments(sys.argv[1:])
    trainer = train(options, training)
    report = {
        "rank": training.process_index,
        "world_size": training.world_size,
        "parallel_mode": str(training.parallel_mode),
        "digest": digest(trainer.model),
    }
    path = Path(training.output_dir) / f"rank-{training.process_index}.json"
    path.write_text(json.dumps(report), encoding="utf-8")


if __name__ == "__main__":
    main()
