"""Make a model folder that runs this package's code on GLM 6B family weights you already downloaded.

    python tools/upgrade_checkpoint.py ~/models/chatglm2-6b ~/models/chatglm2-6b-upgraded

SRC must be a checkpoint of the ChatGLM2 architecture (THUDM/chatglm2-6b, -int4, -32k,
chatglm3-6b, -base, -32k, -128k, codegeex2-6b, -int4, or one saved by this package; the tool says
which it found): a `config.json` with the ChatGLM2 shape keys, a SentencePiece `tokenizer.model`, and weights
(`pytorch_model.bin.index.json` with its shards, a single `pytorch_model.bin` as in the int4 release,
or safetensors). DST receives this repository's code files, `tokenizer_config.json` and
`generation_config.json`, SRC's `config.json` with this package's `auto_map`, and symlinks to SRC's
weights and `tokenizer.model` (`--copy` copies them instead, for filesystems without symlinks). Then

    AutoModel.from_pretrained(DST, trust_remote_code=True)

runs this package's code on the released weights. ChatGLM3 checkpoints (recognised by their name
or the `<|user|>` token in config.json, tokenizer_config.json or tokenization_chatglm.py) get
`chat_format: "chatglm3"` and ChatGLM3's chat template in tokenizer_config.json, and the stop ids
[</s>, <|user|>, <|observation|>] in generation_config.json. Refused, with a one-line reason (exit
status 2): ChatGLM-6B (v1, a different architecture); GLM-4 (another tokenizer); a config this
package's `ChatGLMConfig` refuses (e.g. a `rope_ratio` whose meaning it cannot tell: set
`rope_ratio_applies_to`); and a non-empty DST without --force.
"""

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py", "tokenization_chatglm.py")
PACKAGE_JSON_FILES = ("tokenizer_config.json", "generation_config.json")
# Keys only ChatGLM2's config carries; ChatGLM-6B (v1) has none of them.
CHATGLM2_KEYS = (
    "num_layers",
    "padded_vocab_size",
    "hidden_size",
    "ffn_hidden_size",
    "kv_channels",
    "num_attention_heads",
    "seq_length",
    "multi_query_attention",
)
# What ChatGLM3's and GLM-4's files say about themselves; their chat formats differ from ChatGLM2's.
GLM4_MARKERS = ("glm-4", "glm4")
CHATGLM3_MARKERS = ("chatglm3", "<|user|>")
NEWER_GLM_FILES = ("config.json", "tokenizer_config.json", "tokenization_chatglm.py")
SHARD_INDEXES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Files of DST that --force replaces, beside any weight files.
OWN_NAMES = set(CODE_FILES + PACKAGE_JSON_FILES + ("config.json", "tokenizer.model"))
USAGE_ERROR = 2


class RefusedError(Exception):
    """SRC or DST cannot be used; the message names the file and the reason."""


def read_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RefusedError(f"{path}: cannot read it as JSON ({error})") from None


def check_config(src):
    config_path = src / "config.json"
    if not config_path.is_file():
        raise RefusedError(f"{config_path} is missing: {src} is not a model folder")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("model_type") != "chatglm":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise RefusedError(f"{config_path}: model_type is {found!r}, not 'chatglm': not a ChatGLM2 checkpoint")
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        raise RefusedError(f"{config_path}: this is ChatGLM-6B (v1), a different architecture; this package runs ChatGLM2")
    missing = [key for key in CHATGLM2_KEYS if key not in config]
    if missing:
        raise RefusedError(f"{config_path}: not a ChatGLM2 config, it lacks {', '.join(missing)}")
    if config.get("quantization_bit", 0) not in (0, 4, 8, None):
        raise RefusedError(f"{config_path}: quantization_bit={config['quantization_bit']}; only 0, 4 and 8 exist")
    chat_format = "chatglm2"
    for name in NEWER_GLM_FILES:
        path = src / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").lower()
            marker = next((marker for marker in GLM4_MARKERS if marker in text), None)
            if marker:
                raise RefusedError(f"{path} mentions {marker!r}: this is GLM-4, whose tokenizer differs from ChatGLM2's")
            if any(marker in text for marker in CHATGLM3_MARKERS):
                chat_format = "chatglm3"
    try:
        package_config = package_module("configuration_chatglm").ChatGLMConfig.from_dict(dict(config))
    except ValueError as error:
        raise RefusedError(f"{config_path}: {error}") from None
    return config, chat_format, describe(config, package_config, chat_format)


def package_module(name):
    """This repository's `name`.py (the model files import nothing of each other at module level)."""
    spec = importlib.util.spec_from_file_location(f"chatglm_package_{name}", REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(config, package_config, chat_format):
    """One line naming the model found: its release name when config.json carries it, and what it runs."""
    name = str(config.get("_name_or_path") or "").rstrip("/").split("/")[-1] or "a ChatGLM2-architecture checkpoint"
    rotary = "rotary base 10000"
    if package_config.rope_ratio != 1:
        rotary = f"rope_ratio {package_config.rope_ratio} applied to the {package_config.rope_ratio_applies_to}"
    quantized = f", int{config['quantization_bit']}" if config.get("quantization_bit") else ""
    return f"{name} ({chat_format} chat format, seq_length {config['seq_length']}, {rotary}{quantized})"


def check_tokenizer(src, config, chat_format):
    path = src / "tokenizer.model"
    if not path.is_file():
        raise RefusedError(f"{path} is missing: the tokenizer needs it")
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor()
    try:
        model.Load(str(path))
    except (OSError, RuntimeError) as error:
        raise RefusedError(f"{path}: not a SentencePiece model ({error})") from None
    # The pieces, then [MASK] [gMASK] [sMASK] sop eop (and ChatGLM3's four role tokens).
    token_ids = model.get_piece_size() + (9 if chat_format == "chatglm3" else 5)
    if token_ids > config["padded_vocab_size"]:
        raise RefusedError(
            f"{path}: {token_ids} token ids do not fit the model's padded_vocab_size={config['padded_vocab_size']}"
        )


def weight_files(src):
    """Names of the weight files in SRC (an index and its shards, or one file); RefusedError if none."""
    for index_name in SHARD_INDEXES:
        index_path = src / index_name
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise RefusedError(f"{index_path}: no weight_map")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if Path(shard).name != shard:
                    raise RefusedError(f"{index_path}: shard name {shard!r} points outside the folder")
                if not (src / shard).is_file():
                    raise RefusedError(f"{src / shard} is missing, but {index_name} names it")
            return [index_name, *shards]
    for name in SINGLE_WEIGHT_FILES:
        if (src / name).is_file():
            return [name]
    raise RefusedError(
        f"{src} holds no weights: expected {' or '.join(SHARD_INDEXES)} with its shards, or {' or '.join(SINGLE_WEIGHT_FILES)}"
    )


def prepare_destination(src, dst, force):
    if dst.resolve() == src.resolve():
        raise RefusedError(f"DST {dst} is SRC: write the upgraded folder somewhere else")
    if dst.exists() and not dst.is_dir():
        raise RefusedError(f"DST {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise RefusedError(f"DST {dst} is not empty: pass --force to replace its files")
        # Stale weight files would be picked up by transformers beside the new ones.
        for entry in dst.iterdir():
            is_weight = entry.name.endswith((".bin", ".safetensors", ".index.json"))
            if (entry.is_file() or entry.is_symlink()) and (is_weight or entry.name in OWN_NAMES):
                entry.unlink()
    dst.mkdir(parents=True, exist_ok=True)



def place(source, target, copy):
    """Link (or copy) one file of SRC into DST."""
    if target.is_symlink() or target.exists():
        target.unlink()
    if copy:
        shutil.copyfile(source, target)
        return
    try:
        target.symlink_to(source.resolve())
    except OSError as error:
        raise RefusedError(f"cannot create the symlink {target} ({error}); pass --copy to copy the files instead") from None


def copy_package_files(dst, chat_format="chatglm2", vocab_file=None):
    """This repository's code files, `tokenizer_config.json` and `generation_config.json`, into `dst`;
    for ChatGLM3, those two JSON files in its dialect (template, stop ids of `vocab_file`'s tokenizer)."""
    for name in CODE_FILES + PACKAGE_JSON_FILES:
        shutil.copyfile(REPO_ROOT / name, dst / name)
    if chat_format == "chatglm3":
        tokenization = package_module("tokenization_chatglm")
        tokenizer_config = read_json(REPO_ROOT / "tokenizer_config.json")
        tokenizer_config.update(chat_format="chatglm3", chat_template=tokenization.CHATGLM3_CHAT_TEMPLATE)
        (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
        stops = tokenization.ChatGLMTokenizer(vocab_file=str(vocab_file), chat_format="chatglm3").chat_stop_ids
        generation_config = {**read_json(REPO_ROOT / "generation_config.json"), "eos_token_id": stops}
        (dst / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")


def upgrade(src, dst, force=False, copy=False):
    """Write DST as described in the module docstring; returns the names linked (or copied) from SRC."""
    if not src.is_dir():
        raise RefusedError(f"SRC {src}: no such folder")
    config, chat_format, found = check_config(src)
    check_tokenizer(src, config, chat_format)
    weights = weight_files(src)
    prepare_destination(src, dst, force)

    print(f"found {found}")
    copy_package_files(dst, chat_format, src / "tokenizer.model")
    # The checkpoint's own values (shapes, quantization_bit, torch_dtype) stay; only the code mapping is ours.
    config["auto_map"] = read_json(REPO_ROOT / "config.json")["auto_map"]
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    from_src = ["tokenizer.model", *weights]
    for name in from_src:
        place(src / name, dst / name, copy)
    return from_src


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="upgrade_checkpoint.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, metavar="SRC", help="folder with the downloaded ChatGLM2 checkpoint")
    parser.add_argument("dst", type=Path, metavar="DST", help="folder to write (created if needed)")
    parser.add_argument("--force", action="store_true", help="replace the files of a non-empty DST")
    parser.add_argument("--copy", action="store_true", help="copy the weights and tokenizer.model instead of linking them")
    args = parser.parse_args(argv)
    try:
        linked = upgrade(args.src, args.dst, force=args.force, copy=args.copy)
    except RefusedError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    how = "copied" if args.copy else "linked"
    print(f"wrote {args.dst}: this package's code and config, {how} {len(linked)} file(s) from {args.src}")
    print(f'load it with AutoModel.from_pretrained("{args.dst}", trust_remote_code=True)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
