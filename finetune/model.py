"""Building the model to train, and loading what training wrote.

* P-Tuning v2: the base is loaded with `pre_seq_len` (and `prefix_projection`); the model itself
  freezes everything but `transformer.prefix_encoder` (spec §3.4). A checkpoint holds only the
  `transformer.prefix_encoder.*` tensors, under those full names, in `model.safetensors` (the
  published recipe wrote the same keys to `pytorch_model.bin`; both are read here). It is loaded on
  top of the base as the published recipe did: base with the same `pre_seq_len`, then
  `prefix_encoder.load_state_dict` of the tensors without their `transformer.prefix_encoder.` prefix.
* LoRA: peft adapters on the named linears (`query_key_value` by default); peft saves the adapter.
  With a quantized base, the quantized layers are wrapped by peft's own LoRA `Linear`, which only
  calls the base layer's forward (our quantized layers compute it, gradients included).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX_KEY = "transformer.prefix_encoder."
PREFIX_FILE = "model.safetensors"
PUBLISHED_PREFIX_FILE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def load_base(path, method, pre_seq_len=None, prefix_projection=False, quantize=0, dtype=None):
    """The model to train. P-Tuning v2 gets its prefix encoder; `quantize` (4/8) freezes the base in int4/int8."""
    from transformers import AutoModel

    kwargs = {"trust_remote_code": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if method == "ptuning":
        kwargs.update(pre_seq_len=pre_seq_len, prefix_projection=prefix_projection)
    model = AutoModel.from_pretrained(path, **kwargs)
    if quantize:
        model = model.quantize(quantize)
        if method == "ptuning":
            # As the published recipe: the prefix trains in float32 over the quantized base.
            model.transformer.prefix_encoder.float()
    return model


def add_lora(model, target_modules, r, alpha, dropout):
    """`model` wrapped by peft with LoRA adapters on `target_modules` (names of linears)."""
    import peft

    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
    )
    # Quantized projections are not nn.Linear: peft's LoRA Linear wraps them, reading in/out_features.
    custom = {
        type(module)
        for name, module in model.named_modules()
        if name.split(".")[-1] in target_modules
        and not isinstance(module, torch.nn.Linear)
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    }
    if custom:
        from peft.tuners.lora.layer import Linear as LoraLinear

        config._register_custom_module({kind: LoraLinear for kind in custom})
    lora = peft.get_peft_model(model, config)
    if not any(parameter.requires_grad for parameter in lora.parameters()):
        raise ValueError(f"--lora-target {','.join(target_modules)} matched no layer of the model")
    return lora


def prefix_state(model):
    """The P-Tuning v2 tensors of `model` (a ChatGLM model, or one wrapped by DDP/accelerate)."""
    model = getattr(model, "module", model)
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items() if name.startswith(PREFIX_KEY)}


def save_prefix(state, folder):
    """Write the prefix tensors to `folder`/model.safetensors (through a temporary file)."""
    if not state:
        raise ValueError("the model has no transformer.prefix_encoder to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".prefix-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file(state, temporary, metadata={"format": "pt"})
        os.replace(temporary, folder / PREFIX_FILE)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_prefix(folder):
    """Prefix tensors of a P-Tuning v2 checkpoint folder (ours, or the published recipe's pytorch_model.bin)."""
    folder = Path(folder)
    if (folder / PREFIX_FILE).is_file():
        state = load_file(folder / PREFIX_FILE)
    elif (folder / PUBLISHED_PREFIX_FILE).is_file():
        state = torch.load(folder / PUBLISHED_PREFIX_FILE, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{folder}: no {PREFIX_FILE} or {PUBLISHED_PREFIX_FILE} with P-Tuning v2 weights")
    prefix = {name: tensor for name, tensor in state.items() if name.startswith(PREFIX_KEY)}
    if not prefix or len(prefix) != len(state):
        raise ValueError(
            f"{folder}: not a P-Tuning v2 checkpoint (expected only {PREFIX_KEY}* tensors, found "
            f"{len(prefix)} of {len(state)})"
        )
    return prefix


def prefix_settings(state):
    """(pre_seq_len, prefix_projection) that produced these prefix tensors."""
    return state[PREFIX_KEY + "embedding.weight"].shape[0], any(".trans." in name for name in state)


def load_prefix_into(model, state):
    model.transformer.prefix_encoder.load_state_dict({name[len(PREFIX_KEY) :]: tensor for name, tensor in state.items()})


def load_trained(base, checkpoint=None, quantize=0):
    """(model, tokenizer) for inference: the base folder plus what training wrote to `checkpoint`.

    A LoRA checkpoint (adapter_config.json) is loaded with peft; a P-Tuning v2 checkpoint (prefix
    tensors only) on top of the base with the pre_seq_len it was trained with; no checkpoint (or a
    merged folder passed as `base`) gives the plain model.
    """
    import peft

    tokenizer = load_tokenizer(base)
    if checkpoint is None:
        model = load_base(base, "none", quantize=quantize)
    elif (Path(checkpoint) / ADAPTER_CONFIG).is_file():
        model = peft.PeftModel.from_pretrained(load_base(base, "lora", quantize=quantize), checkpoint)
    else:
        state = read_prefix(checkpoint)
        pre_seq_len, projection = prefix_settings(state)
        model = load_base(base, "ptuning", pre_seq_len=pre_seq_len, prefix_projection=projection, quantize=quantize)
        load_prefix_into(model, state)
    return model.eval(), tokenizer


def merge_lora(base, adapter, output):
    """Write `base` with the LoRA `adapter` merged into its weights to `output`, a folder that
    `from_pretrained(output, trust_remote_code=True)` loads (code files and tokenizer included).

    The adapter is merged into the floating point base even when it was trained over a quantized one.
    Written to a temporary folder beside `output`, then renamed into place.
    """
    import peft

    output = Path(output)
    if output.exists():
        raise ValueError(f"{output} already exists; remove it or choose another folder for the merged model")
    tokenizer = load_tokenizer(base)
    model = peft.PeftModel.from_pretrained(load_base(base, "lora"), adapter).merge_and_unload()
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}-"))
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        missing = [name for name in _code_files(temporary) if not (temporary / name).is_file()]
        if missing:
            raise RuntimeError(f"the merged folder lacks the code files {missing}")
        os.replace(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return output


def _code_files(folder):
    """The .py files that config.json and tokenizer_config.json name in their auto_map."""
    names = set()
    for config_name in ("config.json", "tokenizer_config.json"):
        auto_map = json.loads((Path(folder) / config_name).read_text(encoding="utf-8")).get("auto_map", {})
        for reference in auto_map.values():
            for item in reference if isinstance(reference, list) else [reference]:
                if item:
                    names.add(item.split("--")[-1].split(".")[0] + ".py")
    return sorted(names)
