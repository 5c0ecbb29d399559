"""Turn a floating-point ChatGLM2 checkpoint into an INT8 or INT4 one, one shard at a time.

    python tools/quantize_checkpoint.py --bits 4 path/to/chatglm2-6b path/to/chatglm2-6b-int4

Reads the release's sharded `.bin` files (or safetensors) and writes safetensors shards in the
released quantized format (spec §6), so peak memory is about one input shard plus its output rather
than the whole model. The output folder gets this package's code and json files, the source's
`config.json` with `quantization_bit` set (and what its `rope_ratio` scales written out), the
source's chat format (ChatGLM3: its chat template and stop ids, as `upgrade_checkpoint.py` writes
them), and a copy of `tokenizer.model`, so it loads with
`AutoModel.from_pretrained(DST, trust_remote_code=True)`.

SRC is checked as `upgrade_checkpoint.py` checks it (config, tokenizer, every weight file read and
matched against its index) before anything is written, and DST may not be SRC, lie inside it or
hold it (symlinks resolved). DST is written into a temporary folder beside it and renamed into place
when complete, so a failure leaves no partial DST; with --force the old DST is swapped out only
then, and links in it (from `upgrade_checkpoint.py`) are replaced, never written through. Errors
are one line naming the file (exit status 2).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from quantization import quantize_weight, quantized_projection  # noqa: E402
from tools.model_folder import (  # noqa: E402
    TOKENIZER_FILE,
    ModelFolderError,
    check_destination,
    copy_package_files,
    default_mode,
    exit_status,
    load_weights,
    staged_folder,
)
from tools.upgrade_checkpoint import (  # noqa: E402
    chat_format_of,
    check_source,
    with_rotary_target,
    write_chat_files,
    write_config,
)

def quantize_state(state, bits, shard):
    """The shard's tensors with every projection weight replaced by its quantized weight and scale."""
    output = {}
    for key, tensor in state.items():
        if quantized_projection(key):
            if not tensor.is_floating_point():
                raise ModelFolderError(
                    f"{shard}: {key} is already quantized ({tensor.dtype}); the source must be a floating-point checkpoint"
                )
            qweight, scale = quantize_weight(tensor, bits)
            output[key] = qweight
            output[key + "_scale"] = scale
        else:
            output[key] = tensor.contiguous()
    return output


def convert(source, destination, bits, force=False):
    """Write the quantized checkpoint; returns the bytes of its weights. ModelFolderError says what was refused."""
    config, weights = check_source(source)
    if config.get("quantization_bit"):
        raise ModelFolderError(f"{source} is already quantized to {config['quantization_bit']} bits")
    shards = [source / name for name in weights if not name.endswith(".index.json")]
    destination = check_destination(destination, source, [TOKENIZER_FILE, *weights], force)

    weight_map = {}
    total_size = 0
    # safetensors writes its files readable by their owner only; a model folder is often read by
    # other users (a server's account), so the shards get the mode of every other file written here.
    mode = default_mode()
    with staged_folder(destination) as folder:
        for number, shard in enumerate(tqdm(shards, desc=f"int{bits}", unit="shard"), start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            quantized = quantize_state(load_weights(shard), bits, shard)
            save_file(quantized, folder / name, metadata={"format": "pt"})
            (folder / name).chmod(mode)
            for key, tensor in quantized.items():
                weight_map[key] = name
                total_size += tensor.numel() * tensor.element_size()
            del quantized
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        write_config(folder, dict(with_rotary_target(config), quantization_bit=bits))
        copy_package_files(folder)
        write_chat_files(folder, source / TOKENIZER_FILE, chat_format_of(source), for_serving=False)
        shutil.copyfile(source / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    return total_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with the floating-point checkpoint")
    parser.add_argument("destination", type=Path, help="folder to write the quantized checkpoint to")
    parser.add_argument("--bits", type=int, choices=(4, 8), required=True)
    parser.add_argument("--force", action="store_true", help="replace a non-empty destination")
    args = parser.parse_args(argv)

    def work():
        total_size = convert(args.source, args.destination, args.bits, force=args.force)
        print(f"wrote {total_size / 1e9:.2f} GB of int{args.bits} weights to {args.destination}")

    return exit_status(work)


if __name__ == "__main__":
    sys.exit(main())
