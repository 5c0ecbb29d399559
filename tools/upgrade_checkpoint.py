"""Make a model folder that runs this package's code on GLM 6B family weights you already downloaded.

    python tools/upgrade_checkpoint.py ~/models/chatglm2-6b ~/models/chatglm2-6b-upgraded

SRC must be a checkpoint of the ChatGLM2 architecture (THUDM/chatglm2-6b, -int4, -32k, chatglm3-6b,
-base, -32k, -128k, codegeex2-6b, -int4, or one saved by this package; the tool says which it found):
a `config.json` with the ChatGLM2 shape keys, a SentencePiece `tokenizer.model`, and weights
(`pytorch_model.bin.index.json` with its shards, a single `pytorch_model.bin` as in the int4 release,
or safetensors). DST receives this repository's code files, `tokenizer_config.json` and
`generation_config.json`, SRC's `config.json` with this package's `auto_map`, and symlinks to SRC's
weights and `tokenizer.model` (`--copy` copies them instead, for filesystems without symlinks). Then

    AutoModel.from_pretrained(DST, trust_remote_code=True)

runs this package's code on the released weights. ChatGLM3 checkpoints (recognised by their config
and tokenizer files as the tokenizer recognises them: a stated `chat_format`, the release name in
config.json's `_name_or_path`, or role tokens in tokenizer_config.json; never by the text of code
files, which may be this package's) get `chat_format: "chatglm3"` and ChatGLM3's chat template in
tokenizer_config.json, and the stop ids [</s>, <|user|>, <|observation|>] in generation_config.json.
A folder this package already wrote keeps the chat format its files state. Refused, with a one-line reason (exit
status 2): ChatGLM-6B (v1, a different architecture); GLM-4 (another tokenizer); a config this
package's `ChatGLMConfig` refuses (such as a `rope_ratio` of no known release: set
`rope_ratio_applies_to`); a SRC whose weight files do not read or do not match their index; a DST that
is SRC, lies inside it or holds it (symlinks resolved, those of SRC's files included); and a
non-empty DST without --force.

`--for-serving` writes a folder that vLLM and SGLang serve unchanged (`vllm serve DST
--trust-remote-code`): they run their own ChatGLM implementation, read config.json (every attribute
they read is written explicitly, `original_rope` included, which they need and do not default), load
this package's tokenizer, and render tokenizer_config.json's chat template to one string that they
tokenize without adding special tokens. So the template emits the `[gMASK]sop` prefix (ChatGLM2:
SERVING_CHAT_TEMPLATE; ChatGLM3's template already does) and the tokenizer has
`encode_special_tokens: true`, which maps those literal strings, and ChatGLM3's role names, to
their ids (a user's literal `<|user|>` then becomes a control token). Refused for serving: int4/int8
checkpoints (`quantization_bit`: the engines cannot read that format) and chatglm2-6b-32k (the
engines scale the rotary base by rope_ratio; that release divides the positions by it).

Nothing is written until SRC has been checked. DST is built in a temporary folder beside it and
renamed into place when complete; with --force the old DST is swapped out only then (its files
other than the ones written here and stale weight files are kept), and its links are replaced,
never written through.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.model_folder import (  # noqa: E402
    CONFIG_FILE,
    REPO_ROOT,
    TOKENIZER_FILE,
    ModelFolderError,
    check_destination,
    check_weights,
    copy_package_files,
    exit_status,
    first_line,
    read_json,
    staged_folder,
)

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
# What GLM-4's config and tokenizer files say about themselves; its tokenizer differs from ChatGLM2's.
GLM4_MARKERS = ("glm-4", "glm4")
DESCRIBING_FILES = (CONFIG_FILE, "tokenizer_config.json")
# The config attributes vLLM's and SGLang's ChatGLM models read (vllm/model_executor/models/chatglm.py,
# sglang/srt/models/chatglm.py); a serving folder's config.json carries each, this package's value where SRC has none.
ENGINE_CONFIG_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "multi_query_attention",
    "multi_query_group_num",
    "add_bias_linear",
    "add_qkv_bias",
    "rope_ratio",
    "seq_length",
    "original_rope",
    "ffn_hidden_size",
    "apply_residual_connection_post_layernorm",
    "fp32_residual_connection",
    "rmsnorm",
    "layernorm_epsilon",
    "hidden_dropout",
    "post_layer_norm",
    "num_layers",
    "padded_vocab_size",
    "kv_channels",
    "tie_word_embeddings",
    "max_sequence_length",  # the engines' name for the context length; seq_length here
)
# The architecture name both engines map to their ChatGLM model (SGLang has no other).
ENGINE_ARCHITECTURES = ["ChatGLMModel"]


def check_config(src):
    config_path = src / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFolderError(f"{config_path} is missing: {src} is not a model folder")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("model_type") != "chatglm":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ModelFolderError(f"{config_path}: model_type is {found!r}, not 'chatglm': not a ChatGLM2 checkpoint")
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        raise ModelFolderError(f"{config_path}: this is ChatGLM-6B (v1), a different architecture; this package runs ChatGLM2")
    missing = [key for key in CHATGLM2_KEYS if key not in config]
    if missing:
        raise ModelFolderError(f"{config_path}: not a ChatGLM2 config, it lacks {', '.join(missing)}")
    from configuration_chatglm import ChatGLMConfig  # the package's own checks of each value

    try:
        ChatGLMConfig.from_dict(dict(config))  # transformers 4.57 adds keys to the dict it is given
    except (TypeError, ValueError) as error:
        raise ModelFolderError(f"{config_path}: {first_line(error)}") from None
    if config.get("quantization_bit", 0) not in (0, 4, 8, None):
        raise ModelFolderError(f"{config_path}: quantization_bit={config['quantization_bit']}; only 0, 4 and 8 exist")
    chat_format_of(src)
    return config


def chat_format_of(src):
    """SRC's chat format, read from its config and tokenizer files by the tokenizer's own rule; GLM-4 is refused."""
    for name in DESCRIBING_FILES:
        path = src / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").lower()
            marker = next((marker for marker in GLM4_MARKERS if marker in text), None)
            if marker:
                raise ModelFolderError(f"{path} mentions {marker!r}: this is GLM-4, whose tokenizer differs from ChatGLM2's")
    from tokenization_chatglm import chat_format_of_folder

    return chat_format_of_folder(src)


def describe(config, chat_format):
    """What was found: the release name config.json carries, its chat format, context and rotary variant."""
    from configuration_chatglm import ChatGLMConfig

    settings = ChatGLMConfig.from_dict(dict(config))
    name = str(config.get("_name_or_path") or "").rstrip("/").split("/")[-1] or "a ChatGLM2-architecture checkpoint"
    rotary = "rotary base 10000"
    if settings.rope_ratio != 1:
        rotary = f"rope_ratio {settings.rope_ratio} applied to the {settings.rope_ratio_applies_to}"
    quantized = f", int{config['quantization_bit']}" if config.get("quantization_bit") else ""
    return f"{name} ({chat_format} chat format, seq_length {config['seq_length']}, {rotary}{quantized})"


def write_chat_files(folder, vocab_file, chat_format, for_serving):
    """tokenizer_config.json and generation_config.json for the chat format, where the package's copies differ.

    ChatGLM3: its template and its stop ids. Serving folders: `encode_special_tokens` on and a
    template that emits the prefix (ChatGLM3's does; ChatGLM2's serving variant).
    """
    from tokenization_chatglm import CHATGLM3_CHAT_TEMPLATE, SERVING_CHAT_TEMPLATE, ChatGLMTokenizer

    if chat_format == "chatglm2" and not for_serving:
        return
    tokenizer_config = read_json(REPO_ROOT / "tokenizer_config.json")
    template = CHATGLM3_CHAT_TEMPLATE if chat_format == "chatglm3" else SERVING_CHAT_TEMPLATE
    tokenizer_config.update(chat_format=chat_format, chat_template=template)
    if for_serving:
        tokenizer_config["encode_special_tokens"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    if chat_format == "chatglm3":
        stops = ChatGLMTokenizer(vocab_file=str(vocab_file), chat_format="chatglm3").chat_stop_ids
        generation_config = {**read_json(REPO_ROOT / "generation_config.json"), "eos_token_id": stops}
        (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")


def check_servable(src, config):
    """ModelFolderError unless vLLM and SGLang run SRC's checkpoint as this package does."""
    from configuration_chatglm import ChatGLMConfig

    config_path = src / CONFIG_FILE
    bits = config.get("quantization_bit")
    if bits:
        raise ModelFolderError(
            f"{config_path}: quantization_bit={bits}: vLLM and SGLang cannot read this int{bits} format; "
            "serve the fp16/bf16 release instead, or a format vLLM quantizes (e.g. GPTQ/AWQ made from it)"
        )
    settings = ChatGLMConfig.from_dict(dict(config))
    if settings.rope_ratio != 1 and settings.rope_ratio_applies_to == "positions":
        raise ModelFolderError(
            f"{config_path}: rope_ratio {settings.rope_ratio} divides the positions (chatglm2-6b-32k), but vLLM "
            f"and SGLang multiply the rotary base by it (10000*{settings.rope_ratio}) and would serve a different "
            "model; run it with this package (transformers) instead"
        )


def engine_config(config):
    """SRC's config with every attribute on ENGINE_CONFIG_KEYS, the package's value where SRC has none."""
    from configuration_chatglm import ChatGLMConfig

    settings = ChatGLMConfig.from_dict(dict(config))
    config = dict(config, architectures=ENGINE_ARCHITECTURES)
    config.setdefault("max_sequence_length", config["seq_length"])
    for key in ENGINE_CONFIG_KEYS:
        if key not in config:
            config[key] = getattr(settings, key)
    return config


def with_rotary_target(config):
    """SRC's config with `rope_ratio_applies_to` written out where its `rope_ratio` scales something: the
    releases leave that to their `_name_or_path`, which a copy of the folder need not keep."""
    from configuration_chatglm import ChatGLMConfig

    settings = ChatGLMConfig.from_dict(dict(config))
    if settings.rope_ratio == 1:
        return dict(config)
    return dict(config, rope_ratio_applies_to=settings.rope_ratio_applies_to)


def check_tokenizer(src, config, chat_format="chatglm2"):
    path = src / TOKENIZER_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: the tokenizer needs it")
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor()
    try:
        model.Load(str(path))
    except (OSError, RuntimeError) as error:
        raise ModelFolderError(f"{path}: not a SentencePiece model ({error})") from None
    # The pieces, then [MASK] [gMASK] [sMASK] sop eop (and ChatGLM3's four role tokens).
    token_ids = model.get_piece_size() + (9 if chat_format == "chatglm3" else 5)
    if token_ids > config["padded_vocab_size"]:
        raise ModelFolderError(
            f"{path}: {token_ids} token ids do not fit the model's padded_vocab_size={config['padded_vocab_size']}"
        )


def check_source(src):
    """SRC's config (a dict) and weight file names, once config, tokenizer and every weight file have been read."""
    if not src.is_dir():
        raise ModelFolderError(f"SRC {src}: no such folder")
    config = check_config(src)
    check_tokenizer(src, config, chat_format_of(src))
    return config, check_weights(src)


def write_config(folder, config):
    """SRC's config with this package's `auto_map`: the checkpoint's own values (shapes, dtype) stay."""
    config = dict(config, auto_map=read_json(REPO_ROOT / CONFIG_FILE)["auto_map"])
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def place(source, target, copy):
    """Link (or copy) one file of SRC into the new folder."""
    if copy:
        shutil.copyfile(source, target)
        return
    try:
        target.symlink_to(source.resolve())
    except OSError as error:
        raise ModelFolderError(f"cannot create the symlink {target} ({error}); pass --copy to copy the files instead") from None


def upgrade(src, dst, force=False, copy=False, for_serving=False):
    """Write DST as described in the module docstring; returns the names linked (or copied) from SRC."""
    config, weights = check_source(src)
    chat_format = chat_format_of(src)
    if for_serving:
        check_servable(src, config)
    from_src = [TOKENIZER_FILE, *weights]
    with staged_folder(check_destination(dst, src, from_src, force)) as folder:
        print(f"found {describe(config, chat_format)}")
        copy_package_files(folder)
        write_chat_files(folder, src / TOKENIZER_FILE, chat_format, for_serving)
        write_config(folder, engine_config(config) if for_serving else config)
        for name in from_src:
            place(src / name, folder / name, copy)
    return from_src


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="upgrade_checkpoint.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, metavar="SRC", help="folder with the downloaded ChatGLM2 checkpoint")
    parser.add_argument("dst", type=Path, metavar="DST", help="folder to write (created if needed)")
    parser.add_argument("--force", action="store_true", help="replace the files of a non-empty DST")
    parser.add_argument("--copy", action="store_true", help="copy the weights and tokenizer.model instead of linking them")
    parser.add_argument(
        "--for-serving", action="store_true", help="write a folder vLLM and SGLang serve unchanged (see above)"
    )
    args = parser.parse_args(argv)

    def work():
        linked = upgrade(args.src, args.dst, force=args.force, copy=args.copy, for_serving=args.for_serving)
        how = "copied" if args.copy else "linked"
        print(f"wrote {args.dst}: this package's code and config, {how} {len(linked)} file(s) from {args.src}")
        print(f'load it with AutoModel.from_pretrained("{args.dst}", trust_remote_code=True)')
        if args.for_serving:
            print(f"serve it with: vllm serve {args.dst} --trust-remote-code")

    return exit_status(work)


if __name__ == "__main__":
    sys.exit(main())
