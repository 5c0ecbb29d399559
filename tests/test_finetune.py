"""`python -m finetune`: data encoding, the dry run, launch checks, P-Tuning v2 and LoRA save/load, resume,
quantized bases and the metrics, on the bundled demo model (a few optimizer steps each)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from finetune import data as data_module  # noqa: E402
from finetune import evaluate as evaluate_module  # noqa: E402
from finetune import train as train_module  # noqa: E402
from finetune.model import PREFIX_KEY, load_trained  # noqa: E402

DEMO = REPO_ROOT / "demo" / "tiny-chatglm2"
FACTS = REPO_ROOT / "finetune" / "data" / "facts.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True)


@pytest.fixture
def one_thread():
    # Two threads on a shared 2-core machine spin against each other; these models are tiny.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def chat(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for query, answer in turns:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def run(tmp_path, *arguments):
    """`python -m finetune` in this process; returns the Trainer."""
    options, training = train_module.parse_arguments(
        ["--model", str(DEMO), "--output-dir", str(tmp_path / "out"), "--seed", "0", "--disable-tqdm", "True",
         "--save-strategy", "no", *map(str, arguments)]
    )
    return train_module.train(options, training)


# --- data ---------------------------------------------------------------------------------------


def test_each_answer_is_scored_after_the_prompt_chat_would_feed(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("你好", "你好！"), ("小明的猫叫什么？", "小明的猫叫花花。"))])
    examples, report = data_module.encode(tokenizer, data_module.read_records(path), 512, 512)
    assert report.count == 0 and len(examples) == 2
    for example, (query, history, answer) in zip(
        examples, [("你好", [], "你好！"), ("小明的猫叫什么？", [("你好", "你好！")], "小明的猫叫花花。")]
    ):
        prompt = tokenizer(tokenizer.build_prompt(query, history))["input_ids"]
        target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        assert example.input_ids == prompt + target
        assert example.labels == [-100] * len(prompt) + target
        assert tokenizer.decode([t for t in example.labels if t != -100], skip_special_tokens=True) == answer


def test_content_summary_pairs_are_one_turn_chats(tokenizer, tmp_path):
    pairs = write_jsonl(tmp_path / "adgen.jsonl", [{"content": "类型#裙*颜色#红色", "summary": "红色的裙子。"}])
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat(("类型#裙*颜色#红色", "红色的裙子。"))])
    (from_pairs,), _ = data_module.encode(tokenizer, data_module.read_records(pairs), 512, 512)
    (from_chat,), _ = data_module.encode(tokenizer, data_module.read_records(chats), 512, 512)
    assert (from_pairs.input_ids, from_pairs.labels) == (from_chat.input_ids, from_chat.labels)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"q": "类型#裙*颜色#红色", "a": "红色的裙子。"}])
    (from_renamed,), _ = data_module.encode(tokenizer, data_module.read_records(renamed, "q", "a"), 512, 512)
    assert from_renamed.input_ids == from_pairs.input_ids


def test_a_system_message_goes_through_the_tokenizers_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("你好", "你好！"), system="你是一个助手。")])
    (example,), _ = data_module.encode(tokenizer, data_module.read_records(path), 512, 512)
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )
    assert example.input_ids[: len(prompt)] == list(prompt)
    assert tokenizer.decode(example.input_ids[: len(prompt)], skip_special_tokens=True).startswith("你是一个助手。")


def test_over_long_examples_are_truncated_and_reported_by_file_and_line(tokenizer, tmp_path):
    long_text = "今天天气很好，" * 20
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [chat(("你好", "你好！")), chat((long_text, "好的。")), chat(("你好", long_text)), chat(("嗨", "嗨！"), (long_text, "好。"))],
    )
    examples, report = data_module.encode(tokenizer, data_module.read_records(path), 40, 20)
    assert report.count == 3
    assert [(where, turn) for where, turn, _ in report.prompts] == [(f"{path}:2", 1), (f"{path}:4", 2)]
    assert [(where, turn) for where, turn, _ in report.answers] == [(f"{path}:3", 1)]
    message = report.describe(len(examples))
    assert message.startswith("3 of 5 examples were truncated")
    assert f"{path}:2, {path}:4 (turn 2)" in message and f"{path}:3" in message
    prefix = tokenizer.build_inputs_with_special_tokens([])
    cut_prompt = examples[1]
    prompt_length = cut_prompt.labels.index(next(t for t in cut_prompt.labels if t != -100))
    assert prompt_length == 40 and cut_prompt.input_ids[:2] == prefix
    assert tokenizer.decode(cut_prompt.input_ids[:prompt_length]).endswith("\n\n答：")
    cut_answer = examples[2]
    assert len(cut_answer.input_ids) - cut_answer.labels.count(-100) == 20
    assert cut_answer.input_ids[-1] != tokenizer.eos_token_id  # an answer cut short is not taught to end
    assert examples[0].input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        ('{"messages": []}', "d.jsonl:2: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": 3}]}', "d.jsonl:2: messages[0] needs a string 'content'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "d.jsonl:2: no assistant message"),
        ('{"content": "hi"}', "d.jsonl:2: 'summary' must be a string"),
        ('{"text": "hi"}', "d.jsonl:2: a record needs 'messages'"),
        ('[1, 2]', "d.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_records_are_refused_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat(("a", "b"))) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(data_module.DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data_module.read_records(path)


def test_a_conversation_the_chat_format_refuses_is_named(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}]}],
    )
    with pytest.raises(data_module.DataError, match=r"d\.jsonl:1: the chat template refused this record: .*unknown role"):
        data_module.encode(tokenizer, data_module.read_records(path), 512, 512)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_collator_pads_left_with_positions_and_unscored_padding(tokenizer, tmp_path, padding_side):
    """Left whatever side the tokenizer is set to pad (a folder LLaMA-Factory saved says "right"): the
    labels are placed to match."""
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("你好", "你好！")), chat(("小明的猫叫什么名字？", "小明的猫叫花花。"))])
    examples, _ = data_module.encode(tokenizer, data_module.read_records(path), 512, 512)
    sided = AutoTokenizer.from_pretrained(DEMO, trust_remote_code=True, padding_side=padding_side)
    batch = data_module.Collator(sided)([data_module.ExampleDataset(examples)[i] for i in range(2)])
    short, long = examples
    pad = len(long.input_ids) - len(short.input_ids)
    assert batch["input_ids"][0, pad:].tolist() == short.input_ids
    assert batch["input_ids"][0, :pad].tolist() == [tokenizer.pad_token_id] * pad
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(short.input_ids)
    assert batch["position_ids"][0, pad:].tolist() == list(range(len(short.input_ids)))
    assert batch["labels"][0].tolist() == [-100] * pad + short.labels
    assert batch["labels"][1].tolist() == long.labels


def test_dry_run_prints_examples_with_their_label_masks_and_loads_no_model(tmp_path, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("你好", "你好！")), chat(("今天天气很好，" * 20, "好的。"))])
    monkeypatch.setattr(train_module, "load_base", lambda *a, **k: pytest.fail("a dry run loaded the model"))
    assert run(tmp_path, "--train-file", path, "--dry-run", "--max-source-length", "30") is None
    out = capsys.readouterr().out
    assert "2 examples from" in out
    assert f"1 of 2 examples were truncated; 1 prompts longer than 30 tokens" in out and f"{path}:2" in out
    assert f"example 1 (record {path}:1, answer 1)" in out
    assert "prompt (labels -100): '[Round 1]\\n\\n问：你好\\n\\n答：'" in out
    assert "answer (scored)     : '你好！' + eos" in out
    assert "   -100  '[gMASK]'" in out
    assert "      2  '</s>'" in out  # eos is scored
    assert "example 3" not in out and not (tmp_path / "out").exists()


# --- launching ----------------------------------------------------------------------------------


def test_accelerate_cpu_launch_of_one_process_is_refused_with_the_working_commands(tmp_path, monkeypatch):
    # What `accelerate launch --num_processes 2 --cpu` gives its single child process.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in train_module.WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(train_module.LaunchError, match="torchrun --nproc_per_node N -m finetune"):
        run(tmp_path, "--train-file", FACTS, "--dry-run")


def test_a_single_process_ignores_ddp_backend_and_uses_the_cpu_without_cuda(tmp_path, monkeypatch):
    # transformers + accelerate raise "Default process group has not been initialized" for
    # TrainingArguments(ddp_backend="gloo") in a process that no launcher started.
    for name in (*train_module.WORLD_SIZE_VARIABLES, "ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    options, training = train_module.parse_arguments(
        ["--model", str(DEMO), "--train-file", str(FACTS), "--output-dir", str(tmp_path), "--ddp-backend", "gloo"]
    )
    assert training.ddp_backend is None and training.world_size == 1
    if not torch.cuda.is_available():
        assert training.use_cpu and training.device.type == "cpu"


# --- methods ------------------------------------------------------------------------------------


def test_ptuning_saves_only_the_prefix_and_it_loads_on_top_of_the_base(tmp_path, one_thread):
    trainer = run(
        tmp_path, "--train-file", FACTS, "--method", "ptuning", "--pre-seq-len", 8, "--prefix-projection",
        "--max-steps", 3, "--per-device-train-batch-size", 4, "--learning-rate", 1e-2,
    )
    out = tmp_path / "out"
    saved = load_file(out / "model.safetensors")
    assert saved and all(name.startswith(PREFIX_KEY) for name in saved)
    assert {name[len(PREFIX_KEY):] for name in saved} == {"embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"}
    assert not (out / "config.json").exists()  # from_pretrained(out) cannot silently give a random base
    trained = trainer.model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = trained(ids).logits
        # The published recipe's way: the base with the same pre_seq_len, then the prefix encoder's state.
        base = AutoModel.from_pretrained(DEMO, trust_remote_code=True, pre_seq_len=8, prefix_projection=True).eval()
        base.transformer.prefix_encoder.load_state_dict({k[len(PREFIX_KEY):]: v for k, v in saved.items()})
        torch.testing.assert_close(base(ids).logits, expected)
        loaded, _ = load_trained(DEMO, out)
        torch.testing.assert_close(loaded(ids).logits, expected)
        plain = AutoModel.from_pretrained(DEMO, trust_remote_code=True).eval()
        assert not torch.allclose(plain(ids).logits, expected, atol=1e-3)


def test_ptuning_checkpoints_from_the_published_recipe_load(tmp_path):
    model = AutoModel.from_pretrained(DEMO, trust_remote_code=True, pre_seq_len=4)
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(PREFIX_KEY)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded, _ = load_trained(DEMO, tmp_path)
    assert loaded.config.pre_seq_len == 4 and not loaded.config.prefix_projection
    torch.testing.assert_close(loaded.transformer.prefix_encoder.embedding.weight, state[PREFIX_KEY + "embedding.weight"])


def test_lora_saves_the_adapter_and_merge_writes_a_folder_from_pretrained_loads(tmp_path, one_thread, capsys):
    trainer = run(
        tmp_path, "--train-file", FACTS, "--method", "lora", "--lora-rank", 4, "--lora-dropout", 0, "--merge",
        "--max-steps", 3, "--per-device-train-batch-size", 4, "--learning-rate", 1e-2,
    )
    out = tmp_path / "out"
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in name and "query_key_value" in name for name in adapter)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        loaded, _ = load_trained(DEMO, out)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        merged = AutoModel.from_pretrained(out / "merged", trust_remote_code=True).eval()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert not any("lora" in name for name in merged.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(out / "merged", trust_remote_code=True)
    assert isinstance(merged.chat(tokenizer, "你好", history=[], do_sample=False, max_new_tokens=8)[0], str)
    with pytest.raises(SystemExit):
        train_module.parse_arguments(["--model", str(DEMO), "--train-file", str(FACTS), "--method", "ptuning", "--merge"])
    assert "--merge applies to --method lora" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_resume_from_checkpoint_continues_to_the_same_weights(tmp_path, one_thread, method):
    common = ["--train-file", FACTS, "--method", method, "--pre-seq-len", 4, "--lora-rank", 4,
              "--max-steps", 4, "--per-device-train-batch-size", 4, "--learning-rate", 1e-2]
    straight = run(tmp_path / "a", *common, "--save-strategy", "steps", "--save-steps", 2)
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    if method == "ptuning":
        assert set(load_file(checkpoint / "model.safetensors")) == {PREFIX_KEY + "embedding.weight"}
    resumed = run(tmp_path / "b", *common, "--resume-from-checkpoint", checkpoint)
    assert resumed.state.global_step == 4
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("method,bits", [("lora", 8), ("ptuning", 4)])
def test_training_over_a_quantized_base_changes_only_the_new_weights(tmp_path, one_thread, method, bits):
    trainer = run(
        tmp_path, "--train-file", FACTS, "--method", method, "--quantize", bits, "--pre-seq-len", 8,
        "--max-steps", 4, "--per-device-train-batch-size", 8, "--learning-rate", 1e-2, "--logging-steps", 1,
    )
    model = trainer.model
    assert model.config.quantization_bit == bits
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) if method == "lora" else ("prefix_encoder" in n) for n in trainable)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]


# --- evaluation ---------------------------------------------------------------------------------


def test_metrics_follow_the_published_evaluation():
    same = evaluate_module.scores("小明的猫叫花花。", "小明的猫叫花花。")
    assert same == pytest.approx({"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}, abs=1e-4)
    assert evaluate_module.scores("", "小明的猫叫花花。") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    partial = evaluate_module.scores("小明的狗叫花花。", "小明的猫叫花花。")
    assert 0 < partial["bleu-4"] < 100 and 0 < partial["rouge-1"] < 100
    assert partial["rouge-2"] < partial["rouge-1"]


def test_evaluate_command_scores_a_held_out_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "held_out.jsonl", [chat(("你好", "你好！我是 Tiny ChatGLM2，很高兴见到你。有什么可以帮你的吗？")), {"content": "晚安", "summary": "完全不同的答案"}])
    evaluate_module.main(["--model", str(DEMO), "--data", str(path), "--max-new-tokens", "32", "--output", str(tmp_path / "p.jsonl")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["answers"] == 2 and result["exact"] == 50.0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["prediction"] == rows[0]["reference"] and rows[0]["bleu-4"] == pytest.approx(100.0)
    assert rows[1]["reference"] == "完全不同的答案" and rows[1]["exact"] == 0.0


def test_evaluate_refuses_what_chat_cannot_generate(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("你好", "你好！"), system="你是一个助手。")])
    with pytest.raises(SystemExit, match=r"d\.jsonl:1: evaluation generates with model.chat"):
        evaluate_module.main(["--model", str(DEMO), "--data", str(path)])
