"""Build tiny ChatGLM2 model folders the way users meet them: our code files beside a config and weights.

Weights are written either as the release ships them (sharded torch pickles with an index) or as
transformers saves them (safetensors). Nothing is downloaded.
"""

import json
from pathlib import Path

import torch

from tools.model_folder import REPO_ROOT, copy_package_files

TINY_SHAPES = {
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 96,
    "kv_channels": 16,
    "num_attention_heads": 4,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "seq_length": 256,
    "torch_dtype": "float32",
}


def copy_code(folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy_package_files(folder)
    return folder


def write_config(folder, vocab_size, **overrides):
    """The repository's released `config.json` with tiny shapes (and `overrides`) applied."""
    config = json.loads((REPO_ROOT / "config.json").read_text())
    config.update(TINY_SHAPES, padded_vocab_size=vocab_size, **overrides)
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
    return config


def write_released_shards(state_dict, folder, num_shards=3):
    """Save `state_dict` as the release does: `pytorch_model-0000i-of-0000n.bin` files plus their index."""
    folder = Path(folder)
    names = list(state_dict)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    total_size = 0
    for index in range(num_shards):
        shard_name = f"pytorch_model-{index + 1:05d}-of-{num_shards:05d}.bin"
        shard = {name: state_dict[name].clone() for name in names[index * per_shard : (index + 1) * per_shard]}
        torch.save(shard, folder / shard_name)
        for name, tensor in shard.items():
            weight_map[name] = shard_name
            total_size += tensor.numel() * tensor.element_size()
    index_file = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index_file, indent=2))


def random_model(folder, vocab_size, seed=0, **overrides):
    """A randomly initialised model built from the code and config in `folder` (created here)."""
    from transformers import AutoConfig

    copy_code(folder)
    write_config(folder, vocab_size, **overrides)
    return model_from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), seed)


def model_from_config(config, seed=0):
    """A model with random weights built from a loaded remote-code `config`, in eval mode."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True)
    # Norm weights start at one; perturb them so that tests notice a norm that is skipped or misapplied.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()
