"""Fixtures of the interop tests: the client tools' own released code run against this package.

Each tool runs in a subprocess of its own virtual environment, built by `tests/interop/setup_envs.sh
DIR` and found through CHATGLM_INTEROP_DIR=DIR. Without that variable (a developer's quick run) the
tests skip, saying so; `.ci/run` sets it and fails if any of them skipped.

`interop_dir` (session, `Path`): DIR. `versions` (session, dict): tests/interop/versions.sh.
`run_tool(venv, script_or_args, *args, cwd=None, timeout=...)`: runs `DIR/venv/bin/python` (or one of
its console scripts when the first argument names one) with HF_HUB_OFFLINE=1 and a private
HF_MODULES_CACHE; returns the CompletedProcess, failing the test with the output's tail on a
non-zero exit unless `check=False`.
`glm3_folder` (session, `Path`): a tiny random ChatGLM3 checkpoint in a folder named `chatglm3-6b`
(tools recognise the model by that name), a 2000-piece SentencePiece model, 2048 padded ids;
greedy, its answer to GLM3_QUERY is three tokens and the stop token `<|user|>`.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tiny_checkpoint import REPO_ROOT, random_model

from interop_tools import GLM3_QUERY, HERE, INTEROP_VARIABLE

CORPUS = REPO_ROOT / "tests" / "data" / "bilingual_corpus.txt"
GLM_NAMES = re.compile(r"MASK|sop|eop|system|user|assistant|observation", re.IGNORECASE)


@pytest.fixture(scope="session")
def interop_dir():
    value = os.environ.get(INTEROP_VARIABLE)
    if not value:
        pytest.skip(f"{INTEROP_VARIABLE} is not set: `tests/interop/setup_envs.sh DIR` builds the tools (CI does)")
    folder = Path(value)
    if not folder.is_dir():
        pytest.fail(f"{INTEROP_VARIABLE}={value} is not a folder: build it with tests/interop/setup_envs.sh")
    return folder


@pytest.fixture(scope="session")
def versions():
    pairs = (line.split("=", 1) for line in (HERE / "versions.sh").read_text().splitlines())
    return {key: value for key, value in (pair for pair in pairs if len(pair) == 2) if not key.startswith("#")}


@pytest.fixture(scope="session")
def run_tool(interop_dir, tmp_path_factory):
    modules_cache = tmp_path_factory.mktemp("tool-hf-modules")

    def run(venv, program, *args, cwd=None, timeout=900, env=None, check=True):
        bin_dir = interop_dir / venv / "bin"
        if not (bin_dir / "python").exists():
            pytest.fail(f"{bin_dir / 'python'} is missing: rebuild with tests/interop/setup_envs.sh {interop_dir}")
        console_script = isinstance(program, str) and "/" not in program and (bin_dir / program).exists()
        command = [str(bin_dir / program)] if console_script else [str(bin_dir / "python"), str(program)]
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_MODULES_CACHE": str(modules_cache),
            "PYTHONPATH": "",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        result = subprocess.run(
            command + [str(arg) for arg in args], cwd=cwd, env=environment, capture_output=True, text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"{' '.join(command + [str(arg) for arg in args])} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
            )
        return result

    return run


@pytest.fixture(scope="session")
def glm3_folder(tmp_path_factory, train_sentencepiece_model):
    """Greedy, it answers GLM3_QUERY with three tokens and then `<|user|>`, its stop token, as a trained
    model ends its turn (the output rows of that fourth token and `<|user|>` are swapped)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("glm3") / "chatglm3-6b"
    model = random_model(folder, 2048, add_qkv_bias=True, seq_length=8192)
    # The tests' corpus without the lines that would make a GLM token's name a piece ("people" gives
    # "eop"): the released vocabulary has no such piece, and llama.cpp refuses two equal tokens.
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line and not GLM_NAMES.search(line)]
    (folder / "tokenizer.model").write_bytes(train_sentencepiece_model(lines, 2000))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_format": "chatglm3"}))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    stop = tokenizer.get_command("<|user|>")
    inputs = tokenizer.build_chat_input(GLM3_QUERY)
    answer = model.generate(**inputs, do_sample=False, max_new_tokens=8, eos_token_id=[])[0, inputs["input_ids"].shape[1]:]
    fourth = next(token for index, token in enumerate(answer.tolist()) if index >= 3 and token not in answer[:index])
    rows = model.transformer.output_layer.weight.data
    rows[[fourth, stop]] = rows[[stop, fourth]]
    model.save_pretrained(folder)
    # As in the released chatglm3-6b config.json (save_pretrained leaves the field out); llama.cpp's
    # converter takes the SentencePiece vocabulary only for a config naming THUDM/chatglm3-6b.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "THUDM/chatglm3-6b"}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop, stop + 2], "pad_token_id": 0}))
    return folder
