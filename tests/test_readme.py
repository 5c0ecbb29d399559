"""The README runs as written: its Python snippets run on the bundled demo model, every `python`
command in it (code blocks and inline) starts and parses its arguments, every file it installs from
exists."""

import re
import shlex
import subprocess
import sys

import pytest

from tiny_checkpoint import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
DEMO_MODEL = REPO_ROOT / "demo" / "tiny-chatglm2"
CODE_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)
INLINE_COMMAND = re.compile(r"`(python (?:-m )?[\w./]+[^`]*)`")


def code_blocks(language):
    return [body for found, body in CODE_BLOCK.findall(README) if found == language]


def shell_lines():
    for body in code_blocks("bash"):
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                yield line


def python_commands():
    """{program: [the README's commands that run it]}, a program being `script.py` or `-m module`."""
    commands = [line for line in shell_lines() if line.startswith("python ")]
    commands += INLINE_COMMAND.findall(README)
    programs = {}
    for command in commands:
        words = shlex.split(command)[1:]
        program = words[:2] if words[0] == "-m" else words[:1]
        programs.setdefault(tuple(program), []).append(command)
    return programs


PYTHON_COMMANDS = python_commands()


def test_readme_python_snippets_run_on_the_demo_model(tmp_path):
    snippets = code_blocks("python")
    assert snippets, "the README has no Python snippet"
    for number, snippet in enumerate(snippets):
        # The snippets point at a user's download; run them on the bundled model instead.
        runnable, count = re.subn(r'(?m)^path = .*$', f"path = {str(DEMO_MODEL)!r}", snippet)
        assert count <= 1
        script = tmp_path / f"snippet{number}.py"
        script.write_text(runnable, encoding="utf-8")
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"README snippet {number} failed:\n{snippet}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("program", sorted(PYTHON_COMMANDS), ids=" ".join)
def test_readme_python_commands_start_and_know_the_options_the_readme_gives(program):
    if program == ("-m", "pytest"):
        pytest.skip("this is the test run")
    result = subprocess.run(
        [sys.executable, *program, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"`python {' '.join(program)} --help` failed:\n{result.stderr[-3000:]}"
    assert "usage" in result.stdout.lower()
    for command in PYTHON_COMMANDS[program]:
        for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", command):
            assert option in result.stdout, f"the README runs `{command}`, but {option} is not in its --help"


def test_readme_install_commands_name_files_that_exist():
    installs = [line for line in shell_lines() if line.startswith("pip install")]
    assert installs
    for line in installs:
        words = shlex.split(line)
        for flag, value in zip(words, words[1:]):
            if flag == "-r":
                assert (REPO_ROOT / value).is_file(), f"{line!r} installs from {value}, which does not exist"
        for word in words:
            if word.startswith("./"):  # a package folder of this repository
                assert (REPO_ROOT / word / "pyproject.toml").is_file(), f"{line!r} installs {word}, which is not a package here"
