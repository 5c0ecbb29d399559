"""lm-evaluation-harness 0.4.13's `local-completions` (a model scored through an OpenAI-compatible
API) against `python -m serve` on the demo model, on transformers 4.57.6 and 5.x: the multiple-choice
task of test_lm_eval.py, sent as token ids with `echo` and `logprobs`. Every choice's log-likelihood
equals what `lm_eval --model hf` computes in process, and the trained answer is lm-eval's greedy
continuation (its top log probability at every token)."""

import pytest

from interop_tools import DEMO_MODEL
from serve.process import ServerProcess
from test_lm_eval import QUERIES, samples, write_tasks

pytestmark = pytest.mark.slow


def choice_scores(output, key):
    """Per document, each choice's (log-likelihood, is greedy)."""
    return [[(float(response[0][0]), response[0][1] in (True, "True")) for response in sample["resps"]] for sample in samples(output, key)]


@pytest.mark.parametrize("venv", ["tools-4.57", "tools-5"])
def test_local_completions_scores_choices_as_the_model_does_in_process(run_tool, tmp_path, venv):
    write_tasks(tmp_path)
    common = ["--tasks", "chatglm_choice", "--include_path", tmp_path, "--log_samples"]
    environment = {"HF_HOME": str(tmp_path / "hf-home")}
    run_tool(
        venv, "lm_eval", "--model", "hf", "--model_args", f"pretrained={DEMO_MODEL},trust_remote_code=True,add_bos_token=True,dtype=float32",
        "--device", "cpu", "--output_path", tmp_path / "in-process", *common, cwd=tmp_path, env=environment,
    )  # fmt: skip
    with ServerProcess("--threads", "1") as server:
        arguments = (
            f"model={DEMO_MODEL.name},base_url={server.url}/v1/completions,tokenizer={DEMO_MODEL},"
            "tokenizer_backend=huggingface,trust_remote_code=True,add_bos_token=True,num_concurrent=1,max_retries=1"
        )
        run_tool(venv, "lm_eval", "--model", "local-completions", "--model_args", arguments, "--output_path", tmp_path / "api", *common, cwd=tmp_path, env=environment)
    assert "Traceback" not in server.log, server.log
    in_process, api = choice_scores(tmp_path / "in-process", "chatglm_choice"), choice_scores(tmp_path / "api", "chatglm_choice")
    assert len(api) == len(in_process) == len(QUERIES)
    for expected, got in zip(in_process, api):
        assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], abs=1e-3)
        assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
        assert got[0][1] and got[0][0] == max(value for value, _ in got)  # the trained answer, greedily
