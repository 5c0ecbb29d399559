"""lm-evaluation-harness 0.4.13 (`lm_eval --model hf`, trust_remote_code) on the demo model, with task
files and data written here (no hub): a multiple-choice task scored by log-likelihood and a
`generate_until` task, on transformers 4.57.6 and 5.x, at batch sizes 1 and 4.

The prompts are the demo's trained dialogs in the ChatGLM2 chat format (`add_bos_token=True` gives
them the `[gMASK] sop` prefix, as `model.chat` does), so the right choice and the generated answer are
the demo's trained answers, which `model.chat` gives greedily. The choices follow lm-eval's default
target delimiter, a space: as the answer's first piece carries SentencePiece's "▁" when the model
generates it, the continuation " 你好！..." is tokenized as the model generates it.
"""

import json
import math

import pytest

from interop_tools import DEMO_MODEL

pytestmark = pytest.mark.slow

DIALOGS = [json.loads(line) for line in (DEMO_MODEL.parent / "data" / "dialogs.jsonl").read_text(encoding="utf-8").splitlines()]
ANSWERS = {turns[0][0]: turns[0][1] for turns in DIALOGS if len(turns) == 1}
QUERIES = ["你好", "哈喽", "Hi", "Good evening", "See you later", "你叫什么"]
WRONG = ["晚安，祝你做个好梦！", "Long time no see! How have you been?", "拜拜！祝你一切顺利。"]


def chat_prompt(query):
    """ChatGLM2's published prompt for a first turn (what `tokenizer.build_prompt(query)` gives)."""
    return f"[Round 1]\n\n问：{query}\n\n答："


def write_tasks(folder):
    choice_docs = [
        {"prompt": chat_prompt(query), "choices": [ANSWERS[query]] + WRONG, "answer": 0}
        for query in QUERIES
    ]
    generate_docs = [{"prompt": chat_prompt(query), "answer": ANSWERS[query]} for query in QUERIES]
    for name, docs in (("choice", choice_docs), ("generate", generate_docs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
    common = f"dataset_path: json\ntest_split: test\ndoc_to_text: \"{{{{prompt}}}}\"\n"
    (folder / "chatglm_choice.yaml").write_text(
        "task: chatglm_choice\n" + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'choice.jsonl'}\n"
        + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        + "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    (folder / "chatglm_generate.yaml").write_text(
        "task: chatglm_generate\n" + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'generate.jsonl'}\n"
        + "output_type: generate_until\ndoc_to_target: answer\n"
        + "generation_kwargs:\n  until: [\"\\n\\n\"]\n  do_sample: false\n  max_gen_toks: 48\n"
        + "metric_list:\n  - metric: exact_match\n",
        encoding="utf-8",
    )


def samples(output_dir, task):
    (path,) = output_dir.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module", params=["tools-4.57", "tools-5"])
def lm_eval_runs(request, run_tool, versions, tmp_path_factory):
    """{batch size: output folder} of `lm_eval` runs of both tasks in the venv `request.param`."""
    venv = request.param
    folder = tmp_path_factory.mktemp(f"lm-eval-{venv}")
    write_tasks(folder)
    version = run_tool(venv, "-c", "from importlib.metadata import version; print(version('lm_eval'))").stdout.split()[-1]
    assert version == versions["LM_EVAL"]
    runs = {}
    for batch_size in (1, 4):
        output = folder / f"out-{batch_size}"
        run_tool(
            venv, "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={DEMO_MODEL},trust_remote_code=True,add_bos_token=True,dtype=float32",
            "--tasks", "chatglm_choice,chatglm_generate", "--include_path", folder, "--device", "cpu",
            "--batch_size", batch_size, "--output_path", output, "--log_samples",
            cwd=folder, env={"HF_HOME": str(folder / "hf-home")},
        )
        runs[batch_size] = output
    return runs


def test_multiple_choice_picks_the_trained_answer_greedily_and_batch_4_scores_as_batch_1(lm_eval_runs):
    one, four = (samples(lm_eval_runs[size], "chatglm_choice") for size in (1, 4))
    assert len(one) == len(four) == len(QUERIES)
    for sample_1, sample_4 in zip(one, four):
        scores_1 = [response[0] for response in sample_1["resps"]]
        scores_4 = [response[0] for response in sample_4["resps"]]
        loglikelihoods = [float(score[0]) for score in scores_1]
        assert all(math.isfinite(value) for value in loglikelihoods)
        # model.chat's greedy answer is the right choice: lm-eval scores it as the greedy continuation.
        assert scores_1[0][1] in (True, "True"), sample_1["doc"]["prompt"]
        assert loglikelihoods[0] == max(loglikelihoods)
        assert [float(score[0]) for score in scores_4] == pytest.approx(loglikelihoods, abs=1e-4)
        assert sample_1["acc"] == sample_4["acc"] == 1.0


@pytest.mark.parametrize("batch_size", [1, 4])
def test_generate_until_answers_come_out_whole(lm_eval_runs, batch_size):
    results = samples(lm_eval_runs[batch_size], "chatglm_generate")
    assert len(results) == len(QUERIES)
    for sample in results:
        # filtered_resps: the answer after lm-eval cut it at its stop strings (the EOS text among them).
        assert sample["filtered_resps"][0] == sample["target"], sample["doc"]["prompt"]
        assert sample["exact_match"] == 1.0
