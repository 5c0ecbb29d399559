"""llama.cpp's `convert_hf_to_gguf.py` (the released source in the llama-cpp-python 0.3.36 sdist; its
vocabulary part needs no compiled llama.cpp) on ChatGLM3 folders, on transformers 4.57.6 and 5.x.

The converter takes the SentencePiece vocabulary only when config.json's `_name_or_path` contains
"THUDM/chatglm3-6b" (conversion/chatglm.py, `set_vocab`); any other ChatGLM config goes to its GLM-4
path, which needs a BPE tokenizer.json that no ChatGLM2/3 folder has, whatever the model code. A
ChatGLM2 folder converts by that name when its tokenizer_config.json states `chat_format: chatglm2`
(the shapes of the two releases are the same; the stated format keeps the tokenizer ChatGLM2's). It
reads the published tokenizer surface: `tokenizer.tokenizer.sp_model`, and `_convert_id_to_token`
for every id below `padded_vocab_size`. llama.cpp refuses a vocabulary with two equal tokens
(`GGML_ASSERT(id_to_token.size() == token_to_id.size())`), so every token must be distinct: the
SentencePiece pieces, the GLM and role tokens under their names as control tokens, the padded ids
as unused.
"""

import json
import shutil

import pytest
import sentencepiece
from safetensors import safe_open

from interop_tools import DEMO_MODEL, HERE, last_json_line
from test_chatglm3 import published_vocab  # noqa: F401  (fixture: 64789 pieces at the released ids)
from tiny_checkpoint import copy_code, write_config

pytestmark = pytest.mark.slow

NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6
GLM_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


def convert(run_tool, interop_dir, venv, folder, output, *options):
    converter = interop_dir / "llama.cpp"
    run_tool(venv, converter / "convert_hf_to_gguf.py", folder, "--outfile", output, *options, cwd=output.parent)
    return last_json_line(run_tool(venv, HERE / "gguf_vocab.py", converter, output).stdout)


def expected_vocabulary(sentencepiece_file, padded_vocab_size, glm_tokens=GLM_TOKENS):
    """(tokens, types) as the converter's SentencePiece path must write them for this package's tokenizer."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_file))
    tokens, types = [], []
    for index in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(index))
        types.append(
            UNKNOWN if processor.is_unknown(index) else CONTROL if processor.is_control(index)
            else UNUSED if processor.is_unused(index) else BYTE if processor.is_byte(index) else NORMAL
        )
    tokens[:3] = ["<unk>", "<bos>", "<eos>"]  # the converter's own names for ids 0, 1, 2
    tokens += glm_tokens
    types += [CONTROL] * len(glm_tokens)
    tokens += [f"[PAD{index}]" for index in range(len(tokens), padded_vocab_size)]
    types += [UNUSED] * (padded_vocab_size - len(types))
    return tokens, types


@pytest.mark.parametrize("venv", ["tools-4.57", "tools-5"])
def test_tiny_chatglm3_converts_with_every_token_distinct_and_typed(run_tool, interop_dir, glm3_folder, tmp_path, venv):
    gguf = convert(run_tool, interop_dir, venv, glm3_folder, tmp_path / "tiny.gguf", "--outtype", "f32")
    tokens, types = expected_vocabulary(glm3_folder / "tokenizer.model", 2048)
    assert len(gguf["tokens"]) == 2048
    assert len(set(gguf["tokens"])) == 2048, "duplicate tokens: llama.cpp refuses to load the file"
    assert gguf["tokens"] == tokens
    assert gguf["token_types"] == types
    metadata = gguf["metadata"]
    assert (metadata["general.architecture"], metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.pre"]) == (
        "chatglm", "llama", "chatglm-spm"
    )
    assert metadata["tokenizer.ggml.eos_token_id"] == 2
    # Every weight of the checkpoint went over (the rotary inverse frequencies are recomputed).
    with safe_open(glm3_folder / "model.safetensors", "pt") as weights:
        names = [name for name in weights.keys() if not name.endswith("rotary_pos_emb.inv_freq")]
    assert len(gguf["tensors"]) == len(names)


@pytest.fixture(scope="module")
def released_size_folder(published_vocab, tmp_path_factory):  # noqa: F811
    """The released vocabulary's layout (64789 pieces, 9 GLM tokens, 65024 padded ids), ChatGLM3's
    config.json with tiny shapes, no weights: for `--vocab-only`."""
    folder = tmp_path_factory.mktemp("released-size") / "chatglm3-6b"
    copy_code(folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(published_vocab / name, folder / name)
    write_config(folder, 65024, _name_or_path="THUDM/chatglm3-6b", seq_length=8192)
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_format"] == "chatglm3"
    return folder


@pytest.mark.parametrize("venv", ["tools-4.57", "tools-5"])
def test_released_size_vocabulary_has_65024_distinct_tokens(run_tool, interop_dir, released_size_folder, tmp_path, venv):
    gguf = convert(run_tool, interop_dir, venv, released_size_folder, tmp_path / "vocab.gguf", "--vocab-only")
    tokens, types = expected_vocabulary(released_size_folder / "tokenizer.model", 65024)
    assert len(gguf["tokens"]) == len(set(gguf["tokens"])) == 65024
    assert gguf["tokens"][64789:64798] == GLM_TOKENS
    assert gguf["token_types"][64789:64798] == [CONTROL] * 9
    assert set(gguf["token_types"][64798:]) == {UNUSED}
    assert (gguf["tokens"], gguf["token_types"]) == (tokens, types)


@pytest.mark.parametrize("venv", ["tools-4.57", "tools-5"])
def test_chatglm2_folder_named_chatglm3_keeps_its_five_glm_tokens(run_tool, interop_dir, tmp_path, venv):
    folder = tmp_path / "chatglm2-6b"
    copy_code(folder)
    for name in ("model.safetensors", "tokenizer.model", "generation_config.json"):
        shutil.copy(DEMO_MODEL / name, folder / name)
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "THUDM/chatglm3-6b"}))
    tokenizer_config = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_format": "chatglm2"}))
    gguf = convert(run_tool, interop_dir, venv, folder, tmp_path / "demo.gguf", "--outtype", "f32")
    tokens, types = expected_vocabulary(folder / "tokenizer.model", 2048, GLM_TOKENS[:5])
    assert len(set(gguf["tokens"])) == 2048
    assert (gguf["tokens"], gguf["token_types"]) == (tokens, types)
