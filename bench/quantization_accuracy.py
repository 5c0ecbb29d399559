"""`python -m bench.quantization_accuracy`: how far int8 and int4 move the bundled tiny model from float32.

Random weights say nothing about accuracy, so this uses `demo/tiny-chatglm2`, a trained model, loaded
as a user loads it. For every training dialog it teacher-forces the trained answer through the chat
prompt and compares the logits of `quantize(8)`, `quantize(4)` and `quantize(4, output_layer_bits=8)`,
and of int8/int4 on the onnxruntime CPU kernel (int8 activations) where it is installed, with float32 (relative L2 error, agreement of the top token), then replays each prompt through
greedy `chat` and counts answers that equal float32's. Prints a table and writes `<out>/quantization-accuracy.json`.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from .model_shapes import REPO_ROOT

DEMO_MODEL = REPO_ROOT / "demo" / "tiny-chatglm2"
DIALOGS = REPO_ROOT / "demo" / "data" / "dialogs.jsonl"
# name -> (bits of the layers, bits of output_layer (0 = float), CPU kernel). The model runs in
# float32, so the "torch" rows are the weights' error alone (exact float32 arithmetic, as the published
# CPU kernels); the "onnxruntime" rows add its int8 activations (needs onnxruntime and onnx).
VARIANTS = {
    "int8": (8, 0, "torch"),
    "int4": (4, 0, "torch"),
    "int4, int8 output_layer": (4, 8, "torch"),
    "int8, onnxruntime (int8 activations)": (8, 0, "onnxruntime"),
    "int4, onnxruntime (int8 activations)": (4, 0, "onnxruntime"),
    "int8, chatglm_cpu (int8 activations)": (8, 0, "chatglm_cpu"),
    "int4, chatglm_cpu (int8 activations)": (4, 0, "chatglm_cpu"),
    "int4, int8 output_layer, chatglm_cpu (int8 activations)": (4, 8, "chatglm_cpu"),
}
# What each optional CPU kernel imports; a kernel whose packages are missing is left out of the table.
KERNEL_PACKAGES = {"torch": (), "onnxruntime": ("onnxruntime", "onnx"), "chatglm_cpu": ("chatglm_cpu",)}


def turns(path):
    """(query, history, response) for every turn of every dialog."""
    for line in path.read_text(encoding="utf-8").splitlines():
        history = []
        for query, response in json.loads(line):
            yield query, list(history), response
            history.append((query, response))


def teacher_forced_ids(tokenizer, query, history, response):
    prompt = tokenizer.build_prompt(query, history)
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return torch.tensor([prompt_ids + response_ids]), len(prompt_ids)


def load(model_path, bits=0, output_layer_bits=0, cpu_kernel="torch"):
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True, dtype=torch.float32).eval()
    return model.quantize(bits, output_layer_bits=output_layer_bits, cpu_kernel=cpu_kernel)


def available(cpu_kernel):
    return all(importlib.util.find_spec(name) for name in KERNEL_PACKAGES[cpu_kernel])


@torch.inference_mode()
def measure(model_path, limit):
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    samples = list(turns(DIALOGS))[:limit]
    reference = load(model_path)
    models = {name: load(model_path, *variant) for name, variant in VARIANTS.items() if available(variant[2])}
    errors = {name: [] for name in models}
    agreeing = dict.fromkeys(models, 0)
    answers_equal = dict.fromkeys(models, 0)
    positions = 0
    for query, history, response in samples:
        ids, prompt_length = teacher_forced_ids(tokenizer, query, history, response)
        expected = reference(ids).logits[0, prompt_length - 1 : -1].float()
        positions += expected.shape[0]
        answer = reference.chat(tokenizer, query, history, do_sample=False)[0]
        for name, model in models.items():
            logits = model(ids).logits[0, prompt_length - 1 : -1].float()
            errors[name].append(((logits - expected).norm() / expected.norm()).item())
            agreeing[name] += int((logits.argmax(-1) == expected.argmax(-1)).sum())
            answers_equal[name] += int(model.chat(tokenizer, query, history, do_sample=False)[0] == answer)
    return {
        "model": str(model_path),
        "turns": len(samples),
        "answer_positions": positions,
        "results": {
            name: {
                "mean_relative_logit_error": sum(errors[name]) / len(errors[name]),
                "max_relative_logit_error": max(errors[name]),
                "top_token_agreement": agreeing[name] / positions,
                "greedy_answers_equal_to_float32": answers_equal[name] / len(samples),
            }
            for name in models
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.quantization_accuracy", description=__doc__)
    parser.add_argument("--model-path", type=Path, default=DEMO_MODEL)
    parser.add_argument("--limit", type=int, default=None, help="first N turns only")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    result = measure(args.model_path, args.limit)
    print(f"{result['turns']} turns, {result['answer_positions']} teacher-forced answer positions, vs float32:")
    print("| weights | mean rel. logit error | max rel. logit error | top-token agreement | greedy answers equal |")
    print("|---|---|---|---|---|")
    for name, row in result["results"].items():
        print(
            f"| {name} | {row['mean_relative_logit_error']:.4f} | {row['max_relative_logit_error']:.4f} | "
            f"{row['top_token_agreement']:.1%} | {row['greedy_answers_equal_to_float32']:.1%} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization-accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
