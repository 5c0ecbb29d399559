"""LLaMA-Factory 0.9.5 (`llamafactory-cli`, its own released code) on a tiny ChatGLM3 checkpoint, on the
CPU: LoRA SFT with template chatglm3 on a dataset file written here, save, chat with the adapter
(its `ChatModel`), and export (merge; 0.9.5 then fails writing an Ollama Modelfile for the chatglm3
template, see the test). It loads the tokenizer with `padding_side="right"` and swaps in
transformers' own `_pad`. Run at the newest transformers it allows (5.6.0). 0.9.5 has no chatglm2
template."""

import json
import math

import pytest
import torch

from interop_tools import GLM3_QUERY, HERE, last_json_line

pytestmark = pytest.mark.slow

VENV = "llamafactory"
EXAMPLES = [
    {"instruction": "你好", "input": "", "output": "你好！我是一个小模型。"},
    {"instruction": "Good evening", "input": "", "output": "Good evening! How was your day?"},
    {"instruction": "1+1=?", "input": "", "output": "2"},
    {"instruction": "谢谢", "input": "", "output": "不客气！"},
]


def write_yaml(path, settings):
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(run_tool, versions, glm3_folder, tmp_path_factory):
    """(work folder, adapter folder) after `llamafactory-cli train`: 4 LoRA steps, batch 2."""
    work = tmp_path_factory.mktemp("llamafactory")
    data = work / "data"
    data.mkdir()
    (data / "tiny_sft.json").write_text(json.dumps(EXAMPLES, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"tiny_sft": {"file_name": "tiny_sft.json"}}))
    adapter = work / "adapter"
    config = write_yaml(work / "train.yaml", {
        "model_name_or_path": str(glm3_folder), "trust_remote_code": True,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 4,
        "dataset": "tiny_sft", "dataset_dir": str(data), "template": "chatglm3", "cutoff_len": 64,
        "overwrite_cache": True, "dataloader_num_workers": 0,
        "output_dir": str(adapter), "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no",
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1.0e-2,
        "max_steps": 4, "report_to": "none", "bf16": False, "fp16": False, "seed": 0,
    })
    version = run_tool(VENV, "-c", "from importlib.metadata import version; print(version('llamafactory'))").stdout.split()[-1]
    assert version == versions["LLAMAFACTORY"]
    run_tool(VENV, "llamafactory-cli", "train", config, cwd=work, env={"HF_HOME": str(work / "hf-home")})
    return work, adapter


def test_lora_training_runs_and_saves_an_adapter_of_the_attention_and_mlp(trained):
    _, adapter = trained
    logs = [json.loads(line) for line in (adapter / "trainer_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    targets = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    assert {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} <= targets
    assert "output_layer" not in targets
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().max() > 0 for tensor in lora_b), "training left every LoRA B at zero"


def test_chat_with_the_adapter_answers_as_generate_with_it(run_tool, trained, glm3_folder):
    _, adapter = trained
    result = last_json_line(run_tool(VENV, HERE / "llamafactory_chat.py", glm3_folder, adapter, GLM3_QUERY, 12).stdout)
    assert result["prompt_length"] == result["ours_prompt_length"]  # the chatglm3 template gives our chat ids
    assert result["ours"].strip(), "generate gave an empty answer: nothing to compare"
    assert result["llamafactory"] == result["ours"]


def test_export_merges_the_adapter_into_a_folder_that_loads_and_chats(run_tool, trained, glm3_folder):
    work, adapter = trained
    exported = work / "merged"
    config = write_yaml(work / "export.yaml", {
        "model_name_or_path": str(glm3_folder), "adapter_name_or_path": str(adapter), "template": "chatglm3",
        "finetuning_type": "lora", "trust_remote_code": True, "export_dir": str(exported), "export_size": 1,
        "export_device": "cpu", "export_legacy_format": False,
    })
    result = run_tool(VENV, "llamafactory-cli", "export", config, cwd=work, env={"HF_HOME": str(work / "hf-home")}, check=False)
    if result.returncode != 0:
        # LLaMA-Factory 0.9.5 writes the merged model and tokenizer, then fails writing an Ollama
        # Modelfile for any chatglm3-template model: its Modelfile writer refuses the template's
        # [gMASK]/sop token slots. Its bug, whatever the model code; nothing else may fail.
        assert result.stderr.rstrip().endswith("ValueError: Dict is not supported."), result.stderr[-3000:]
        assert "get_ollama_modelfile" in result.stderr
    with_adapter = last_json_line(run_tool(VENV, HERE / "llamafactory_chat.py", glm3_folder, adapter, GLM3_QUERY, 12).stdout)
    merged = last_json_line(run_tool(VENV, HERE / "llamafactory_chat.py", exported, "-", GLM3_QUERY, 12).stdout)
    assert merged["llamafactory"] == merged["ours"] == with_adapter["ours"]
    # The merged weights are the base weights plus the adapter's update, in this package's layout.
    from safetensors.torch import load_file

    base = load_file(glm3_folder / "model.safetensors")
    (merged_file,) = exported.glob("*.safetensors")
    merged_weights = load_file(merged_file)
    assert set(merged_weights) == set(base)
    changed = [name for name in base if not torch.equal(base[name].float(), merged_weights[name].float())]
    assert changed and all(".self_attention." in name or ".mlp." in name for name in changed)
