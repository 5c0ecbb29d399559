"""demo/cli_demo.py: one-shot `--query` answers, the interactive loop, Ctrl-C, and one-line errors."""

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from tiny_checkpoint import REPO_ROOT

CLI = REPO_ROOT / "demo" / "cli_demo.py"
DEMO_MODEL = REPO_ROOT / "demo" / "tiny-chatglm2"


def trained_answer(*queries):
    """The dialog set's answer to the last query after the earlier ones."""
    for line in (REPO_ROOT / "demo" / "data" / "dialogs.jsonl").read_text(encoding="utf-8").splitlines():
        dialog = json.loads(line)
        if [query for query, _ in dialog[: len(queries)]] == list(queries):
            return dialog[len(queries) - 1][1]
    raise KeyError(queries)


def run_cli(*args, stdin=None, timeout=180):
    return subprocess.run(
        [sys.executable, str(CLI), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def load_cli():
    spec = importlib.util.spec_from_file_location("cli_demo", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_query_mode_prints_the_answer_and_exits_zero():
    result = run_cli("--greedy", "--query", "你好")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == trained_answer("你好")


def test_repeated_queries_form_one_conversation():
    result = run_cli("--greedy", "--query", "My name is Bob.", "--query", "What is my name?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [trained_answer("My name is Bob."), trained_answer("My name is Bob.", "What is my name?")]


def test_query_mode_with_int8_quantization():
    result = run_cli("--greedy", "--quantize", "8", "--dtype", "float32", "--device", "cpu", "--query", "Who are you?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == trained_answer("Who are you?")


@pytest.mark.skipif(importlib.util.find_spec("chatglm_cpu") is None, reason="chatglm_cpu is optional")
def test_query_mode_with_int4_on_the_chatglm_cpu_kernel():
    result = run_cli("--greedy", "--quantize", "4", "--cpu-kernel", "chatglm_cpu", "--device", "cpu", "--query", "Who are you?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == trained_answer("Who are you?")


def test_error_for_an_unknown_cpu_kernel_names_the_choices():
    # The model checks the name, so the error comes after transformers' loading progress bar.
    result = run_cli("--cpu-kernel", "fastest", "--query", "hi")
    assert result.returncode == 2 and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "cpu_kernel must be one of" in last and "'chatglm_cpu'" in last and "'fastest'" in last


def test_interactive_chat_keeps_history_until_cleared():
    typed = "我叫小明。\n我叫什么名字？\nclear\n我叫什么名字？\nstop\n"
    result = run_cli("--greedy", stdin=typed)
    assert result.returncode == 0, result.stderr
    assert "'clear'" in result.stdout and "'stop'" in result.stdout, "the banner names the commands"
    assert trained_answer("我叫小明。", "我叫什么名字？") in result.stdout
    after_clear = result.stdout.split("(conversation cleared)")[1]
    assert trained_answer("我叫什么名字？") in after_clear


def test_end_of_input_at_the_prompt_exits_cleanly():
    result = run_cli("--greedy", stdin="Hello\n")
    assert result.returncode == 0, result.stderr
    assert trained_answer("Hello") in result.stdout and "Traceback" not in result.stderr


def test_ctrl_c_stops_the_answer_not_the_program():
    # Sampling at a huge temperature draws near-uniform tokens; seeded with 1, the answer runs on for hundreds
    # of tokens. (Seed 0's drew </s> after about 30: a fast machine finished it before the interrupt landed,
    # and the Ctrl-C then quit at the prompt.)
    # A terminal's user has Ctrl-C delivered; a test run started in the background (`cmd &` in a script) passes
    # SIGINT on ignored, and Python then never raises KeyboardInterrupt: the child gets the default back.
    process = subprocess.Popen(
        [sys.executable, str(CLI), "--temperature", "1000", "--top-p", "1", "--seed", "1", "--max-new-tokens", "100000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    output = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: process.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        process.stdin.write("你好\n")
        process.stdin.flush()
        deadline = time.monotonic() + 120
        while len("".join(output).partition("ChatGLM: ")[2]) < 20:
            assert time.monotonic() < deadline and process.poll() is None, "".join(output)
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        while "[stopped]" not in "".join(output):
            assert time.monotonic() < deadline and process.poll() is None, "".join(output)
            time.sleep(0.05)
        process.stdin.write("stop\n")
        process.stdin.flush()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    assert "Traceback" not in process.stderr.read()


def test_stopped_answer_stays_in_the_history():
    cli = load_cli()

    class InterruptedModel:
        def stream_chat(self, tokenizer, query, history, **options):
            yield "Hel", history + [(query, "Hel")]
            yield "Hello", history + [(query, "Hello")]
            raise KeyboardInterrupt

    written = []

    class Output:
        write = written.append

        def flush(self):
            pass

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL, trust_remote_code=True)
    response, history, stopped = cli.stream_answer(InterruptedModel(), tokenizer, "hi", [("a", "b")], {}, Output())
    assert stopped and response == "Hello" and history == [("a", "b"), ("hi", "Hello")]
    assert "".join(written) == "Hello"


def copy_demo_model(folder, skip=()):
    """The demo model folder with real files (code copied from the repository), minus `skip`."""
    folder.mkdir()
    for entry in DEMO_MODEL.iterdir():
        if entry.name not in skip:
            shutil.copyfile(entry.resolve(), folder / entry.name)
    return folder


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def test_error_for_a_missing_model_path(tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_line_error(run_cli("--model-path", missing, "--query", "hi"), str(missing), "no such folder")


def test_error_for_a_folder_without_tokenizer_model(tmp_path):
    folder = copy_demo_model(tmp_path / "model", skip=("tokenizer.model",))
    assert_one_line_error(run_cli("--model-path", folder, "--query", "hi"), "tokenizer.model is missing")


def test_error_for_a_folder_without_weights(tmp_path):
    folder = copy_demo_model(tmp_path / "model", skip=("model.safetensors",))
    assert_one_line_error(run_cli("--model-path", folder, "--query", "hi"), "holds no weights")


def truncated_demo_model(tmp_path):
    folder = copy_demo_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return weights


def test_error_for_truncated_weights_names_the_file(tmp_path):
    weights = truncated_demo_model(tmp_path)
    assert_one_line_error(run_cli("--model-path", weights.parent, "--query", "hi"), f"{weights}: cannot read its weights", "truncated")


def test_from_pretrained_names_a_truncated_weights_file(tmp_path):
    """Users who load the folder themselves get the file's name too, not the reader's bare message."""
    from transformers import AutoModel

    weights = truncated_demo_model(tmp_path)
    with pytest.raises(OSError, match=f"^{re.escape(str(weights))}: cannot read its weights, the file is truncated or corrupt"):
        AutoModel.from_pretrained(weights.parent, trust_remote_code=True)


def test_error_for_a_folder_without_the_code_files(tmp_path):
    folder = copy_demo_model(tmp_path / "model", skip=("modeling_chatglm.py",))
    assert_one_line_error(run_cli("--model-path", folder, "--query", "hi"), "modeling_chatglm.py is missing", "upgrade_checkpoint")


def test_error_for_symlink_placeholders_left_by_git(tmp_path):
    folder = copy_demo_model(tmp_path / "model")
    (folder / "modeling_chatglm.py").write_text("../../modeling_chatglm.py")
    assert_one_line_error(run_cli("--model-path", folder, "--query", "hi"), "symlink", "core.symlinks")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (("--quantize", "3"), "--quantize"),
        (("--top-p", "1.5"), "--top-p"),
        (("--temperature", "0"), "--temperature"),
        (("--max-new-tokens", "0"), "--max-new-tokens"),
        (("--dtype", "float64"), "--dtype"),
        (("--device", "tpu"), "--device"),
    ],
)
def test_error_for_bad_flag_values(flags, fragment):
    assert_one_line_error(run_cli(*flags, "--query", "hi"), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_for_an_unavailable_device():
    assert_one_line_error(run_cli("--device", "cuda", "--query", "hi"), "--device cuda")


def test_help_documents_the_commands_and_flags():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("clear", "stop", "Ctrl-C", "--model-path", "--quantize", "--device", "--dtype", "--max-new-tokens", "--greedy", "--query"):
        assert text in result.stdout


def test_tools_are_refused_for_a_chatglm2_model_in_one_line(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text("[]", encoding="utf-8")
    result = run_cli("--tools", str(tools), "--query", "你好")
    assert result.returncode == 2
    assert "need a ChatGLM3 model" in result.stderr and "Traceback" not in result.stderr
