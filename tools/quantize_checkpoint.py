"""Turn a floating-point ChatGLM2 checkpoint into an INT8 or INT4 one, one shard at a time.

    python tools/quantize_checkpoint.py --bits 4 path/to/chatglm2-6b path/to/chatglm2-6b-int4

Reads the release's sharded `.bin` files (or safetensors) and writes safetensors shards in the
released quantized format (spec §6), so peak memory is about one input shard plus its output rather
than the whole model. The output folder gets this package's code and json files, the source's
`config.json` with `quantization_bit` set, and a copy of `tokenizer.model`, so it loads with
`AutoModel.from_pretrained(DST, trust_remote_code=True)`.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from quantization import quantize_weight, quantized_projection  # noqa: E402
from upgrade_checkpoint import copy_package_files  # noqa: E402  (beside this script)

def fail(message):
    print(f"quantize_checkpoint: {message}", file=sys.stderr)
    raise SystemExit(2)


def source_shards(source):
    """The weight files of `source`, in the order their index lists them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = source / index_name
        if index.exists():
            files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            missing = [name for name in files if not (source / name).exists()]
            if missing:
                fail(f"{index} lists {missing[0]}, which is not in {source}")
            return [source / name for name in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (source / single).exists():
            return [source / single]
    fail(f"no weights in {source}: expected pytorch_model.bin(.index.json) or model.safetensors(.index.json)")


def new_file_mode():
    """The mode `open()` gives a new file here: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_shard(path):
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def quantize_state(state, bits):
    """The shard's tensors with every projection weight replaced by its quantized weight and scale."""
    output = {}
    for key, tensor in state.items():
        if quantized_projection(key):
            if not tensor.is_floating_point():
                fail(f"{key} is already quantized ({tensor.dtype}); the source must be a floating-point checkpoint")
            qweight, scale = quantize_weight(tensor, bits)
            output[key] = qweight
            output[key + "_scale"] = scale
        else:
            output[key] = tensor.contiguous()
    return output


def convert(source, destination, bits, force=False):
    config_path = source / "config.json"
    if not config_path.exists():
        fail(f"{config_path} not found: SRC must be a ChatGLM2 model folder")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "chatglm" or "multi_query_attention" not in config:
        fail(f"{config_path} is not a ChatGLM2 config (model_type chatglm with multi_query_attention)")
    if config.get("quantization_bit", 0):
        fail(f"{source} is already quantized to {config['quantization_bit']} bits")
    shards = source_shards(source)
    if destination.exists() and any(destination.iterdir()) and not force:
        fail(f"{destination} is not empty (pass --force to write into it)")
    destination.mkdir(parents=True, exist_ok=True)

    weight_map = {}
    total_size = 0
    # safetensors writes its files readable by their owner only; a model folder is often read by
    # other users (a server's account), so the shards get the mode of every other file written here.
    mode = new_file_mode()
    for number, shard in enumerate(tqdm(shards, desc=f"int{bits}", unit="shard"), start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        quantized = quantize_state(load_shard(shard), bits)
        save_file(quantized, destination / name, metadata={"format": "pt"})
        (destination / name).chmod(mode)
        for key, tensor in quantized.items():
            weight_map[key] = name
            total_size += tensor.numel() * tensor.element_size()
        del quantized
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (destination / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    ours = json.loads((REPO_ROOT / "config.json").read_text())
    config.update(quantization_bit=bits, auto_map=ours["auto_map"])
    (destination / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    copy_package_files(destination)
    if (source / "tokenizer.model").exists():
        shutil.copy(source / "tokenizer.model", destination / "tokenizer.model")
    return total_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with the floating-point checkpoint")
    parser.add_argument("destination", type=Path, help="folder to write the quantized checkpoint to")
    parser.add_argument("--bits", type=int, choices=(4, 8), required=True)
    parser.add_argument("--force", action="store_true", help="write into a non-empty destination")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        fail(f"{args.source} is not a folder")
    total_size = convert(args.source, args.destination, args.bits, force=args.force)
    print(f"wrote {total_size / 1e9:.2f} GB of int{args.bits} weights to {args.destination}")


if __name__ == "__main__":
    main()
