"""Fixtures shared by the test files. Nothing here is downloaded.

`sentencepiece_model_path` (session, `pathlib.Path`): a `tokenizer.model` trained at test time on
`tests/data/bilingual_corpus.txt`, built like the released one: BPE, byte fallback, `<unk>`=0,
`<s>`=1, `</s>`=2, no pad piece, text kept as written (no normalisation, so newlines and the
full-width `：` survive). 2000 pieces, so the tokenizer's vocabulary is 2005 ids.

`train_sentencepiece_model` (session): a function `(lines, vocab_size) -> bytes` that trains a
model the same way on other text, for tests that need a different vocabulary.

`tokenizer_dir` (session, `pathlib.Path`): a folder holding the repository's
`tokenization_chatglm.py` and `tokenizer_config.json` beside that model, to be loaded the way users
load the release: `AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)`. Treat it
as read-only; copy it to change it.

transformers copies remote code into HF_MODULES_CACHE (the user's home by default) when it loads
it, and reads the variable at import, so this file points it at a temporary folder before any test
imports transformers.
"""

import atexit
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import sentencepiece

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "data" / "bilingual_corpus.txt"
SENTENCEPIECE_PIECES = 2000

_modules_cache = tempfile.mkdtemp(prefix="chatglm-test-hf-modules-")
atexit.register(shutil.rmtree, _modules_cache, ignore_errors=True)
os.environ["HF_MODULES_CACHE"] = _modules_cache
os.environ["HF_HUB_OFFLINE"] = "1"


def _train_sentencepiece_model(lines, vocab_size):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="session")
def train_sentencepiece_model():
    return _train_sentencepiece_model


@pytest.fixture(scope="session")
def sentencepiece_model_path(tmp_path_factory):
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]
    path = tmp_path_factory.mktemp("sentencepiece") / "tokenizer.model"
    path.write_bytes(_train_sentencepiece_model(lines, SENTENCEPIECE_PIECES))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, sentencepiece_model_path):
    folder = tmp_path_factory.mktemp("chatglm_tokenizer")
    for name in ("tokenization_chatglm.py", "tokenizer_config.json"):
        shutil.copy(REPO_ROOT / name, folder / name)
    shutil.copy(sentencepiece_model_path, folder / "tokenizer.model")
    return folder


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); `pytest -m cuda` runs them alone")
