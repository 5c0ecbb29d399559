"""The bundled demo model: a trained tiny ChatGLM2 that gives its trained answers end to end.

Everything goes through the user's path: AutoTokenizer/AutoModel with trust_remote_code on
`demo/tiny-chatglm2`, whose code files are links to the repository's, then `chat`/`stream_chat` in
greedy mode, so tokenizer, prompt format, positions, rotary embedding, KV cache and generation all
have to be right for the answers to come out exactly.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from tiny_checkpoint import REPO_ROOT
from tools.model_folder import MODEL_MODULES

DEMO_MODEL = REPO_ROOT / "demo" / "tiny-chatglm2"
DIALOGS = REPO_ROOT / "demo" / "data" / "dialogs.jsonl"
TRAIN_SCRIPT = REPO_ROOT / "demo" / "train_tiny_model.py"
WEIGHT_BUDGET_BYTES = 10 * 1000 * 1000

SINGLE_TURN_QUERIES = (
    "你好",
    "你是谁？",
    "中国的首都是哪里？",
    "水的沸点是多少？",
    "谢谢",
    "Hello",
    "Who are you?",
    "What is the capital of France?",
    "How many planets are in the solar system?",
    "Tell me a joke",
)
# Follow-ups whose right answer depends on the earlier turns.
MULTI_TURN_DIALOGS = (
    ("我叫小明。", "我叫什么名字？"),
    ("My name is Alice.", "What is my name?"),
    ("法国的首都是哪里？", "那里有什么著名景点？"),
    ("日本的首都是哪里？", "那里有什么著名景点？"),
    ("How many planets are in the solar system?", "Which one is the largest?", "And the smallest?"),
)


def load_dialogs():
    return [json.loads(line) for line in DIALOGS.read_text(encoding="utf-8").splitlines() if line.strip()]


def trained_answers():
    """{(history queries..., query): response} over every turn of the dialog set."""
    answers = {}
    for dialog in load_dialogs():
        for index, (_, response) in enumerate(dialog):
            answers[tuple(query for query, _ in dialog[: index + 1])] = response
    return answers


ANSWERS = trained_answers()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL, trust_remote_code=True)


@pytest.fixture(scope="module")
def model():
    return AutoModel.from_pretrained(DEMO_MODEL, trust_remote_code=True).eval()


def greedy_conversation(model, tokenizer, queries):
    """Answers to `queries` asked one after another, each with the history so far."""
    history = []
    for query in queries:
        _, history = model.chat(tokenizer, query, history=history, do_sample=False, max_new_tokens=96)
    return [response for _, response in history]


def expected_conversation(queries):
    return [ANSWERS[tuple(queries[: index + 1])] for index in range(len(queries))]


def test_demo_folder_links_to_the_one_implementation():
    for name in MODEL_MODULES:
        link = DEMO_MODEL / name
        assert link.is_symlink(), f"{link} must be a symlink to the repository's {name}, not a copy"
        target = os.readlink(link)
        assert not os.path.isabs(target), f"{link} -> {target} must be relative, so that clones anywhere work"
        assert link.resolve() == (REPO_ROOT / name).resolve()


def test_demo_folder_holds_a_small_chatglm2_model():
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert config["auto_map"] == json.loads((REPO_ROOT / "config.json").read_text())["auto_map"]
    assert config["model_type"] == "chatglm" and config["multi_query_attention"] is True
    weights = DEMO_MODEL / "model.safetensors"
    assert weights.stat().st_size <= WEIGHT_BUDGET_BYTES
    with safe_open(weights, framework="pt") as handle:
        assert "transformer.rotary_pos_emb.inv_freq" in handle.keys()
        assert handle.get_tensor("transformer.output_layer.weight").shape[0] == config["padded_vocab_size"]


def test_dialog_set_is_bilingual_with_follow_ups():
    dialogs = load_dialogs()
    turns = [turn for dialog in dialogs for turn in dialog]
    assert len(turns) >= 300
    has_chinese = sum(any("\u4e00" <= char <= "\u9fff" for char in query) for query, _ in turns)
    assert 100 <= has_chinese <= len(turns) - 100
    assert sum(len(dialog) > 1 for dialog in dialogs) >= 30


def test_tokenizer_is_the_demo_models_own(tokenizer, model):
    assert tokenizer.vocab_size <= model.config.padded_vocab_size
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    encoded = tokenizer(tokenizer.build_prompt("你好"))
    assert encoded["input_ids"][:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == "[Round 1]\n\n问：你好\n\n答："


@pytest.mark.parametrize("query", SINGLE_TURN_QUERIES)
def test_chat_gives_the_trained_answer(model, tokenizer, query):
    response, history = model.chat(tokenizer, query, history=[], do_sample=False, max_new_tokens=96)
    assert response == ANSWERS[(query,)]
    assert history == [(query, response)]


@pytest.mark.parametrize("queries", MULTI_TURN_DIALOGS, ids=lambda queries: queries[0])
def test_chat_follow_ups_use_the_history(model, tokenizer, queries):
    assert greedy_conversation(model, tokenizer, queries) == expected_conversation(queries)


def test_same_follow_up_gets_different_answers_after_different_histories(model, tokenizer):
    after_paris = greedy_conversation(model, tokenizer, ("法国的首都是哪里？", "那里有什么著名景点？"))[-1]
    after_tokyo = greedy_conversation(model, tokenizer, ("日本的首都是哪里？", "那里有什么著名景点？"))[-1]
    alone = greedy_conversation(model, tokenizer, ("我叫什么名字？",))[-1]
    after_name = greedy_conversation(model, tokenizer, ("我叫小红。", "我叫什么名字？"))[-1]
    assert "巴黎" in after_paris and "东京" in after_tokyo
    assert alone == ANSWERS[("我叫什么名字？",)] and after_name == "你叫小红。"


@pytest.mark.parametrize(
    "opening, queries",
    [
        (("你好",), ("What is the capital of France?", "What is it famous for?")),
        (("Hello", "谢谢"), ("我叫王芳。", "我叫什么名字？")),
        (("Good morning",), ("太阳系有几颗行星？", "最大的是哪一颗？")),
    ],
    ids=lambda value: value[0],
)
def test_trained_answers_after_unrelated_earlier_turns(model, tokenizer, opening, queries):
    """As in the terminal: greet first, then ask. Training put random single-turn dialogs before others."""
    answers = greedy_conversation(model, tokenizer, opening + queries)
    assert answers == [ANSWERS[(query,)] for query in opening] + expected_conversation(queries)


@pytest.mark.parametrize("queries", [("你好",), ("What is the capital of Japan?",), ("我叫李雷。", "我叫什么名字？")])
def test_stream_chat_streams_the_trained_answer(model, tokenizer, queries):
    history = []
    for query in queries:
        partials = [response for response, _ in model.stream_chat(tokenizer, query, history=history, do_sample=False)]
        assert len(partials) > 1, "stream_chat should yield as tokens arrive"
        assert all(partials[-1].startswith(partial) for partial in partials)
        history = history + [(query, partials[-1])]
    assert [response for _, response in history] == expected_conversation(queries)


def test_cached_continuation_feeds_the_full_prompts_ids_and_gives_the_same_answers(model, tokenizer):
    """Three turns through stream_chat's returned cache against fresh full prompts: the ids fed after the
    cache are the tail of the full prompt's ids (no SentencePiece dummy-prefix piece), and the greedy
    answers agree."""
    history, cache = [], None
    for query in ("你好", "你是谁？", "谢谢"):
        if history:
            fed = tokenizer.build_chat_input(query, history, continuation=True)["input_ids"][0].tolist()
            full = tokenizer.build_chat_input(query, history)["input_ids"][0].tolist()
            assert full[-len(fed) :] == fed
            assert tokenizer.convert_ids_to_tokens(fed[:1]) == ["<0x0A>"]
        *_, (cached, new_history, cache) = model.stream_chat(
            tokenizer, query, history, past_key_values=cache, return_past_key_values=True, do_sample=False
        )
        fresh, _ = model.chat(tokenizer, query, history, do_sample=False)
        assert cached == fresh and cached
        history = new_history


def test_chat_and_stream_chat_stop_at_stop_strings(model, tokenizer):
    full, _ = model.chat(tokenizer, "你好", do_sample=False)
    response, _ = model.chat(tokenizer, "你好", do_sample=False, stop_strings=["。"])
    assert response == full[: full.index("。") + 1]
    *_, (streamed, _) = model.stream_chat(tokenizer, "你好", do_sample=False, stop_strings=["。"])
    assert streamed == response


@pytest.mark.parametrize("bits", [8, 4])
def test_answers_survive_quantization(tokenizer, bits):
    """Measured on all 326 training turns: every answer is still exact after quantize(8) and after
    quantize(4). Here every 10th turn (33, with their histories); a little slack is allowed."""
    model = AutoModel.from_pretrained(DEMO_MODEL, trust_remote_code=True).quantize(bits).eval()
    assert model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.int8
    sampled = [(dialog, index) for dialog in load_dialogs() for index in range(len(dialog))][::10]
    exact = 0
    for dialog, index in sampled:
        query, expected = dialog[index]
        response, _ = model.chat(tokenizer, query, history=dialog[:index], do_sample=False, max_new_tokens=96)
        exact += response == expected
    assert exact >= 0.9 * len(sampled), f"{exact}/{len(sampled)} exact after quantize({bits})"


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_tiny_model", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dialog_loader_refuses_contradictions_and_bad_turns(tmp_path):
    train_script = load_train_script()
    path = tmp_path / "dialogs.jsonl"
    path.write_text('[["hi", "Hello!"]]\n[["hi", "Hey!"]]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r":2: 'hi' after the same history already has the answer 'Hello!' \(line 1\)"):
        train_script.load_dialogs(path)
    path.write_text('[["hi", "Hello!"]]\n[["hi", "Hello!"], ["again", "Hi again!"]]\n', encoding="utf-8")
    assert len(train_script.load_dialogs(path)) == 2
    path.write_text('[["hi", "Hello!"]]\n[["hi", "Hello!"], ["bye", "See you!"]]\n[["bye", "Farewell!"]]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"'bye' is answered 'See you!' after \['hi'\] but 'Farewell!' as a first turn"):
        train_script.load_dialogs(path)
    path.write_text('[["hi"]]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r":1: each turn must be \[query, response\]"):
        train_script.load_dialogs(path)


def test_training_script_runs_quickly(tmp_path):
    """`--quick` takes a few steps: the whole script (tokenizer, folder, training, saving, checking) runs."""
    output = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training: 100%" in result.stderr, "tqdm progress bar expected on stderr"
    assert "greedy chat exact, dialogs as written:" in result.stdout
    for name in MODEL_MODULES:
        assert (output / name).is_symlink() and (output / name).resolve() == (REPO_ROOT / name).resolve()
    tokenizer = AutoTokenizer.from_pretrained(output, trust_remote_code=True)
    model = AutoModel.from_pretrained(output, trust_remote_code=True)
    assert model.config.padded_vocab_size % 64 == 0 and model.config.padded_vocab_size >= tokenizer.vocab_size
    # A few training steps may answer only spaces; the chat path must still give what generate gives.
    response, _ = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=4)
    prompt = tokenizer.build_chat_input("你好")["input_ids"]
    generated = model.generate(prompt, do_sample=False, max_new_tokens=4)[0, prompt.shape[1] :]
    assert response == tokenizer.decode(generated.tolist(), skip_special_tokens=True).strip()
