"""Quantization at the model level (spec §6): quantize(), pre-quantized checkpoints, errors, training."""

import copy
import importlib
import json
import pickle
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from transformers import AutoModel

from quantization_helpers import Q, chatglm_cpu_runs, dequantized_weight, page_faults_reading
from tiny_checkpoint import copy_code, random_model, write_config

VOCAB = 160
PROJECTIONS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float")
    random_model(folder, VOCAB, add_qkv_bias=True).save_pretrained(folder)
    return folder


def load(folder, **kwargs):
    return AutoModel.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


def ids_of(batch=1, length=9, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(logits, reference):
    return ((logits - reference).norm() / reference.norm()).item()


def test_quantize_replaces_exactly_the_four_projections(float_folder):
    model = load(float_folder).quantize(4)
    assert model.config.quantization_bit == 4
    for layer in model.transformer.encoder.layers:
        for path in PROJECTIONS:
            assert type(layer.get_submodule(path)).__name__ == "QuantizedLinear"
    assert isinstance(model.transformer.output_layer, torch.nn.Linear)
    assert isinstance(model.transformer.embedding.word_embeddings, torch.nn.Embedding)


def test_quantize_is_idempotent_and_zero_bits_is_a_no_op(float_folder):
    model = load(float_folder)
    assert model.quantize(0) is model and model.config.quantization_bit == 0
    assert model.quantize(8) is model
    weight = model.transformer.encoder.layers[0].self_attention.dense.weight
    assert model.quantize(8) is model
    assert model.transformer.encoder.layers[0].self_attention.dense.weight is weight
    with pytest.raises(ValueError, match="already quantized to 8"):
        model.quantize(4)
    with pytest.raises(ValueError):
        load(float_folder).quantize(3)


def test_int8_tracks_float_closer_than_int4_and_greedy_tokens_mostly_agree(float_folder):
    reference_model = load(float_folder)
    ids = ids_of(batch=2, length=12)
    reference = reference_model(ids).logits
    errors = {}
    for bits in (8, 4):
        quantized = load(float_folder).quantize(bits)
        logits = quantized(ids).logits
        errors[bits] = relative_error(logits, reference)
        agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        assert agreement >= (0.95 if bits == 8 else 0.7), (bits, agreement)
    assert errors[8] < errors[4] < 0.2, errors


@pytest.mark.parametrize("bits", [4, 8])
def test_float32_quantized_model_matches_float32_layers_with_the_dequantized_weights(float_folder, bits):
    """The published CPU kernels dequantize to float32 and multiply in float32: a float32 model's
    quantized layers must give those logits to 1e-5, through the prompt and through decode steps."""
    quantized = load(float_folder, dtype=torch.float32).quantize(bits, cpu_kernel="torch")
    dequantized = load(float_folder, dtype=torch.float32)
    for quantized_layer, float_layer in zip(quantized.transformer.encoder.layers, dequantized.transformer.encoder.layers):
        for path in PROJECTIONS:
            layer = quantized_layer.get_submodule(path)
            with torch.no_grad():
                weight = dequantized_weight(layer.released_weight(), layer.weight_scale.float(), bits)
                float_layer.get_submodule(path).weight.copy_(weight)
    ids = ids_of(batch=2, length=12)
    with torch.no_grad():
        for _ in range(2):  # the first call also moves CPU int4 weights into their kernel layout
            prompt = quantized(ids[:, :-1], use_cache=True)
            step = quantized(ids[:, -1:], past_key_values=prompt.past_key_values, use_cache=True).logits
        reference = dequantized(ids).logits
    assert relative_error(prompt.logits, reference[:, :-1]) < 1e-5
    assert relative_error(step, reference[:, -1:]) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_saved_quantized_model_uses_the_released_names_and_reloads_bit_for_bit(float_folder, tmp_path, bits):
    model = load(float_folder).quantize(bits)
    ids = ids_of()
    logits = model(ids).logits  # after a forward, int4 weights sit in the CPU kernel layout
    model.save_pretrained(tmp_path)
    copy_code(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_bit"] == bits
    state = model.state_dict()
    name = "transformer.encoder.layers.0.mlp.dense_4h_to_h"
    hidden, ffn = model.config.hidden_size, model.config.ffn_hidden_size
    assert state[name + ".weight"].dtype == torch.int8
    assert state[name + ".weight"].shape == (hidden, ffn if bits == 8 else ffn // 2)
    assert state[name + ".weight_scale"].shape == (hidden,)

    reloaded, info = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, tensor in state.items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    torch.testing.assert_close(reloaded.eval()(ids).logits, logits)


def write_released_int4_file(float_folder, folder):
    """`folder` as the int4 release ships: one float16 `pytorch_model.bin`. Returns (model, its state dict)."""
    quantized = load(float_folder, dtype=torch.float16).quantize(4)
    state = {key: tensor.clone() for key, tensor in quantized.state_dict().items()}
    copy_code(folder)
    write_config(folder, VOCAB, add_qkv_bias=True, quantization_bit=4, torch_dtype="float16")
    torch.save(state, folder / "pytorch_model.bin")
    return quantized, state


def test_released_int4_single_file_loads_as_is(float_folder, tmp_path):
    quantized, state = write_released_int4_file(float_folder, tmp_path)
    loaded, info = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True, dtype="auto")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, tensor in state.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids = ids_of()
    torch.testing.assert_close(loaded.eval()(ids).logits, quantized(ids).logits)


def test_int4_weights_of_a_mapped_bin_checkpoint_convert_where_they_were_loaded(float_folder, tmp_path):
    # transformers memory-maps .bin files and hands their tensors over as the parameters. Converting
    # them in place keeps one copy of the weights in memory; the mapping is private, so the file
    # on disk stays the released bytes.
    quantized, state = write_released_int4_file(float_folder, tmp_path)
    file_bytes = (tmp_path / "pytorch_model.bin").read_bytes()
    loaded = load(tmp_path, dtype="auto", quantization_cpu_kernel="torch")  # the kernel with its own int4 layout
    quantized.quantize(4, cpu_kernel="torch")
    weights = [
        module.weight for module in loaded.modules() if type(module).__name__ == "QuantizedLinear"
    ]
    addresses = [weight.data_ptr() for weight in weights]
    ids = ids_of()
    torch.testing.assert_close(loaded(ids).logits, quantized(ids).logits)
    assert all(weight.dtype == torch.uint8 for weight in weights)
    assert [weight.data_ptr() for weight in weights] == addresses
    assert (tmp_path / "pytorch_model.bin").read_bytes() == file_bytes
    for key, tensor in state.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_checkpoint_not_matching_quantization_bit_names_the_tensor(float_folder, tmp_path):
    copy_code(tmp_path)
    write_config(tmp_path, VOCAB, add_qkv_bias=True, quantization_bit=4)
    for file in float_folder.glob("*.safetensors"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match=r"model\.safetensors: transformer\.encoder\.layers\.\d+\.[a-z_.0-9]+\.weight: a 4-bit quantized layer needs an "
        r"int8 weight of shape \(\d+, \d+\), got torch.float32 of shape \(\d+, \d+\)\. It is not quantized"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True)


def test_quantized_checkpoint_loaded_as_float_names_its_bit_width(float_folder, tmp_path):
    model = load(float_folder).quantize(8)
    model.save_pretrained(tmp_path)
    copy_code(tmp_path)
    with pytest.raises(ValueError, match=r"layers\.\d+\.[a-z_.0-9]+\.weight: a floating point layer .*set quantization_bit=8"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True, quantization_bit=0)


def test_quantize_on_the_way_to_a_device(float_folder):
    model = load(float_folder).quantize(8, device="cpu")
    assert torch.isfinite(model(ids_of()).logits).all()
    assert model.transformer.encoder.layers[1].mlp.dense_h_to_4h.weight.device.type == "cpu"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_generates_like_its_own_forward(float_folder, bits):
    model = load(float_folder).quantize(bits)
    ids = ids_of()
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    sequence = ids
    for _ in range(4):
        sequence = torch.cat((sequence, model(sequence).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(generated, sequence)


def test_ptuning_trains_on_a_quantized_base(float_folder):
    model = AutoModel.from_pretrained(float_folder, trust_remote_code=True, pre_seq_len=3).quantize(4).train()
    ids = ids_of(batch=2)
    model(ids, labels=ids).loss.backward()
    assert model.transformer.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.prefix_encoder.embedding.weight"]


# ---------------------------------------------------------------------------------------------
# Opt-in: the output layer quantized too (not in the release)
# ---------------------------------------------------------------------------------------------


def test_output_layer_quantization_is_opt_in_and_stays_close(float_folder):
    reference = load(float_folder)(ids_of(batch=2, length=12)).logits
    layers_only = load(float_folder).quantize(4)
    assert isinstance(layers_only.transformer.output_layer, torch.nn.Linear)
    assert layers_only.config.output_layer_quantization_bit == 0

    model = load(float_folder).quantize(4, output_layer_bits=8)
    output_layer = model.transformer.output_layer
    assert type(output_layer).__name__ == "QuantizedLinear" and output_layer.bits == 8
    assert model.config.output_layer_quantization_bit == 8
    logits = model(ids_of(batch=2, length=12)).logits
    layers_only_logits = layers_only(ids_of(batch=2, length=12)).logits
    # The int8 output layer adds far less error than the int4 layers already bring.
    assert relative_error(logits, layers_only_logits) < 0.5 * relative_error(layers_only_logits, reference)


def test_output_layer_quantization_can_follow_and_is_idempotent(float_folder):
    model = load(float_folder).quantize(8)
    assert model.quantize(8, output_layer_bits=8) is model
    output_layer = model.transformer.output_layer
    assert model.quantize(8, output_layer_bits=8).transformer.output_layer is output_layer
    with pytest.raises(ValueError, match="output_layer_quantization_bit"):
        model.quantize(8, output_layer_bits=4)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        load(float_folder).quantize(8, output_layer_bits=2)


def test_saved_model_with_quantized_output_layer_reloads_bit_for_bit(float_folder, tmp_path):
    model = load(float_folder).quantize(4, output_layer_bits=8)
    ids = ids_of()
    logits = model(ids).logits
    model.save_pretrained(tmp_path)
    copy_code(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert (saved_config["quantization_bit"], saved_config["output_layer_quantization_bit"]) == (4, 8)
    state = model.state_dict()
    assert state["transformer.output_layer.weight"].dtype == torch.int8
    assert state["transformer.output_layer.weight_scale"].shape == (VOCAB,)

    reloaded, info = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, tensor in state.items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    torch.testing.assert_close(reloaded.eval()(ids).logits, logits)

    with pytest.raises(ValueError, match=r"output_layer\.weight: a floating point layer .*set output_layer_quantization_bit=8"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True, output_layer_quantization_bit=0)


def test_cpu_kernel_choice_is_saved_in_the_config_and_applies_after_reloading(float_folder, tmp_path):
    model = load(float_folder).quantize(4, cpu_kernel="onnxruntime")
    assert model.config.quantization_cpu_kernel == "onnxruntime"
    assert model.transformer.encoder.layers[0].mlp.dense_h_to_4h.cpu_kernel == "onnxruntime"
    model.save_pretrained(tmp_path)
    copy_code(tmp_path)
    reloaded = load(tmp_path)
    kernels = {module.cpu_kernel for module in reloaded.modules() if type(module).__name__ == "QuantizedLinear"}
    assert kernels == {"onnxruntime"}
    with torch.no_grad():  # runs with or without onnxruntime installed (without: the torch kernels, and a warning)
        assert torch.isfinite(reloaded(ids_of()).logits).all()
    assert load(tmp_path).quantize(4, cpu_kernel="torch").transformer.encoder.layers[1].self_attention.dense.cpu_kernel == "torch"


@pytest.fixture
def chatglm_cpu_calls(monkeypatch):
    """A list that gets one entry per chatglm_cpu kernel call: "normed" where a quantized projection applied an
    RMSNorm to its input, "swiglu" where it took [gate | up], "plain" where neither, "float" for a float weight,
    "attend" for a decode step's attention; skips where the package cannot run."""
    if not chatglm_cpu_runs():
        pytest.skip("chatglm_cpu is optional and needs AVX2")
    import chatglm_cpu

    calls = []
    kernel = chatglm_cpu.QuantizedWeight.__call__
    def counted(*args, **kwargs):
        calls.append("normed" if kwargs.get("rms_norm") is not None else "swiglu" if kwargs.get("swiglu") else "plain")
        return kernel(*args, **kwargs)

    monkeypatch.setattr(chatglm_cpu.QuantizedWeight, "__call__", counted)
    float_kernel = chatglm_cpu.FloatWeight.__call__
    def counted_float(*args, **kwargs):
        calls.append("float")
        return float_kernel(*args, **kwargs)

    monkeypatch.setattr(chatglm_cpu.FloatWeight, "__call__", counted_float)
    attend = chatglm_cpu.attend
    def counted_attend(*args, **kwargs):
        calls.append("attend")
        return attend(*args, **kwargs)

    monkeypatch.setattr(chatglm_cpu, "attend", counted_attend)
    return calls


@pytest.mark.parametrize("bits", [4, 8])
def test_chatglm_cpu_kernel_model_tracks_the_exact_kernels_and_generates(float_folder, bits, chatglm_cpu_calls):
    calls = chatglm_cpu_calls
    exact = load(float_folder, dtype=torch.float16).quantize(bits, cpu_kernel="torch")
    fast = load(float_folder, dtype=torch.float16).quantize(bits, cpu_kernel="chatglm_cpu")
    ids = ids_of(batch=2, length=12)
    with torch.no_grad():
        reference = exact(ids).logits.float()
        logits = fast(ids).logits.float()
    # Only the activations' int8 rounding separates them (about 0.5% per projection on this model).
    assert relative_error(logits, reference) < 0.03
    assert sum(map(calls.count, ("plain", "normed", "swiglu"))) == 4 * fast.config.num_layers  # every projection ran on it
    assert calls.count("normed") == 2 * fast.config.num_layers  # with the norms before QKV and the MLP
    assert calls.count("swiglu") == fast.config.num_layers  # and the MLP's SwiGLU
    calls.clear()
    tokens = fast.generate(ids, max_new_tokens=6, do_sample=False)
    assert tokens.shape == (2, 18) and torch.equal(tokens[:, :12], ids)
    assert calls.count("float") == 6  # the output layer of every step: the last positions of 2 sequences
    assert calls.count("attend") == 5 * fast.config.num_layers  # every layer of the 5 steps after the prompt


def test_decode_steps_attend_on_chatglm_cpu_as_torch_does(float_folder, chatglm_cpu_calls):
    model = load(float_folder, dtype=torch.bfloat16)
    ids = ids_of(batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: masked keys
    with torch.no_grad():
        prompt = model(ids, attention_mask=mask, use_cache=True)
        step = dict(input_ids=ids[:, :1], attention_mask=torch.cat((mask, mask[:, :1]), 1), use_cache=True)
        cache = prompt.past_key_values
        logits = model(**step, past_key_values=copy.deepcopy(cache)).logits.float()
        assert chatglm_cpu_calls.count("attend") == model.config.num_layers
        for layer in model.transformer.encoder.layers:
            layer.self_attention.cpu_kernel = "torch"
        reference = model(**step, past_key_values=cache).logits.float()
    assert chatglm_cpu_calls.count("attend") == model.config.num_layers
    assert relative_error(logits, reference) < 2e-3  # bfloat16 roundings of the context


def test_chatglm_cpu_applies_the_norms_in_its_projections_unless_a_hook_or_gradients_need_the_modules(float_folder, chatglm_cpu_calls):
    model = load(float_folder, dtype=torch.float16).quantize(4, cpu_kernel="chatglm_cpu")
    layers = model.transformer.encoder.layers
    ids = ids_of(batch=2, length=12)
    with torch.no_grad():
        fused = model(ids).logits.float()
    assert chatglm_cpu_calls.count("normed") == 2 * len(layers)

    def unfused_logits_seen_by_hooks_on(modules):
        seen = []
        hooks = [module.register_forward_pre_hook(lambda module, args: seen.append(args[0])) for module in modules]
        chatglm_cpu_calls.clear()
        with torch.no_grad():
            logits = model(ids).logits.float()
        for hook in hooks:
            hook.remove()
        assert chatglm_cpu_calls.count("normed") == 0 and len(seen) == len(modules)
        return logits, seen

    norms = [norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    hooked_norms, norm_inputs = unfused_logits_seen_by_hooks_on(norms)
    # Only the normed activations' rounding to float16 before their int8 quantization separates the two.
    assert relative_error(fused, hooked_norms) < 0.01
    # A hook on a sublayer sees its input normed, as it always did.
    sublayers = [sublayer for layer in layers for sublayer in (layer.self_attention, layer.mlp)]
    hooked_sublayers, sublayer_inputs = unfused_logits_seen_by_hooks_on(sublayers)
    assert torch.equal(hooked_sublayers, hooked_norms)
    assert torch.equal(sublayer_inputs[0], layers[0].input_layernorm(norm_inputs[0]))

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for norm in norms:
        norm.weight.requires_grad_(True)  # only the norms train: they must run as modules
    chatglm_cpu_calls.clear()
    model(ids).logits.sum().backward()
    assert chatglm_cpu_calls.count("normed") == 0 and all(norm.weight.grad is not None for norm in norms)


def test_chatglm_cpu_takes_the_swiglu_in_the_mlps_last_projection_unless_a_hook_needs_its_input(float_folder, chatglm_cpu_calls):
    model = load(float_folder, dtype=torch.float16).quantize(4, cpu_kernel="chatglm_cpu")
    projections = [layer.mlp.dense_4h_to_h for layer in model.transformer.encoder.layers]
    ids = ids_of(batch=2, length=12)
    with torch.no_grad():
        fused = model(ids).logits.float()
    assert chatglm_cpu_calls.count("swiglu") == len(projections)
    seen = []
    for projection in projections:
        projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    chatglm_cpu_calls.clear()
    with torch.no_grad():
        hooked = model(ids).logits.float()
    # the hooks see silu(gate) * up, as without chatglm_cpu; only its rounding to float16 separates the two
    assert chatglm_cpu_calls.count("swiglu") == 0 and [x.shape[-1] for x in seen] == [model.config.ffn_hidden_size] * len(projections)
    assert relative_error(fused, hooked) < 0.01


def test_a_residual_taken_after_the_norm_keeps_the_norm_a_module(tmp_path, chatglm_cpu_calls):
    random_model(tmp_path, VOCAB, apply_residual_connection_post_layernorm=True).save_pretrained(tmp_path)
    model = load(tmp_path, dtype=torch.float16).quantize(4, cpu_kernel="chatglm_cpu")
    ids = ids_of(batch=2, length=12)
    with torch.no_grad():
        logits = model(ids).logits
    assert chatglm_cpu_calls.count("normed") == 0
    # As with the first norm of every layer hooked (a hooked norm always runs as a module).
    for layer in model.transformer.encoder.layers:
        layer.input_layernorm.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_a_quantized_checkpoint_runs_on_chatglm_cpu_by_default_and_saves_no_kernel_choice(float_folder, tmp_path, chatglm_cpu_calls):
    load(float_folder, dtype=torch.float16).quantize(4).save_pretrained(tmp_path)
    copy_code(tmp_path)
    assert "quantization_cpu_kernel" not in json.loads((tmp_path / "config.json").read_text())
    model = load(tmp_path, dtype="auto")
    with torch.no_grad():
        model(ids_of())
    assert sum(map(chatglm_cpu_calls.count, ("plain", "normed", "swiglu"))) == 4 * model.config.num_layers
    assert all(module.weight.dtype == torch.int8 for module in model.modules() if type(module).__name__ == "QuantizedLinear")


def test_the_output_layer_runs_on_chatglm_cpu_through_the_module_and_on_torch_for_gradients(float_folder, chatglm_cpu_calls):
    model = load(float_folder, dtype=torch.float16).quantize(4, cpu_kernel="chatglm_cpu")
    head = model.transformer.output_layer
    ids = ids_of(batch=2, length=8)  # 16 rows: one pass of the float kernel, on every CPU
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        logits = model(ids).logits.float()
        assert chatglm_cpu_calls.count("float") == 1 and len(seen) == 1  # through the module: hooks see it
        quantization = importlib.import_module(type(head).__module__)
        quantization.set_cpu_kernel(head, "torch")
        reference = model(ids).logits.float()
        assert chatglm_cpu_calls.count("float") == 1  # the reference is torch's
        quantization.set_cpu_kernel(head, "chatglm_cpu")
        # float32 sums in another order than torch's: within float16's rounding
        assert torch.allclose(logits, reference, rtol=2e-3, atol=2e-3) and not torch.equal(logits, torch.zeros_like(logits))
    chatglm_cpu_calls.clear()
    model(ids).logits.sum().backward()  # gradients: torch's matmul, which computes them
    assert chatglm_cpu_calls.count("float") == 0 and head.weight.grad is not None


def test_a_float_models_projections_and_output_layer_run_on_chatglm_cpu_unless_float32_or_told_otherwise(float_folder, chatglm_cpu_calls):
    model = load(float_folder, dtype=torch.bfloat16)
    assert model.transformer.output_layer.cpu_kernel == "chatglm_cpu"  # the default where the package runs
    assert {type(model.transformer.encoder.layers[0].get_submodule(path)) for path in PROJECTIONS} == {type(model.transformer.output_layer)}
    with torch.no_grad():
        model(ids_of())
    assert chatglm_cpu_calls == ["float"] * (len(PROJECTIONS) * model.config.num_layers + 1)
    chatglm_cpu_calls.clear()
    with torch.no_grad():
        load(float_folder)(ids_of())  # float32 weights: torch's
        chosen = load(float_folder, dtype=torch.bfloat16, quantization_cpu_kernel="torch")  # chosen at load
        chosen.generate(ids_of(), max_new_tokens=3, do_sample=False)
    assert chatglm_cpu_calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float_model_on_chatglm_cpu_computes_torchs_function(float_folder, dtype, chatglm_cpu_calls):
    fast = load(float_folder, dtype=dtype)
    exact = load(float_folder, dtype=dtype, quantization_cpu_kernel="torch")
    ids = ids_of(batch=2, length=3 * 16 + 5)  # a prompt of several passes over each weight, where it takes them
    with torch.no_grad():
        reference = exact(ids).logits.float()
        logits = fast(ids).logits.float()
        # the same products added in another order: a few roundings of the dtype apart after two layers
        assert relative_error(logits, reference) < 0.02
        assert torch.equal(fast.generate(ids, max_new_tokens=8, do_sample=False), exact.generate(ids, max_new_tokens=8, do_sample=False))
    # every matrix of the 7 decode steps after the prompt (and of the prompts too, where oneDNN has no GEMM in the dtype)
    assert chatglm_cpu_calls.count("float") >= 7 * (len(PROJECTIONS) * fast.config.num_layers + 1)


@pytest.mark.parametrize("has_gemm", [False, True])
def test_a_float_prompt_runs_on_chatglm_cpu_only_where_onednn_has_no_gemm_in_its_dtype(float_folder, has_gemm, chatglm_cpu_calls, monkeypatch):
    model = load(float_folder, dtype=torch.bfloat16)
    quantization = importlib.import_module(type(model.transformer.output_layer).__module__)
    monkeypatch.setattr(quantization, "_cpu_has_gemm", lambda dtype: has_gemm)
    with torch.no_grad():
        model(ids_of(length=17))  # one row more than a pass: a prompt
        assert chatglm_cpu_calls == ([] if has_gemm else ["float"] * (len(PROJECTIONS) * model.config.num_layers + 1))
        chatglm_cpu_calls.clear()
        model(ids_of(length=16))  # up to a pass: one read of each weight, on chatglm_cpu wherever it runs
        assert chatglm_cpu_calls == ["float"] * (len(PROJECTIONS) * model.config.num_layers + 1)


def test_a_model_pickles_and_deep_copies_without_its_kernels_handles(float_folder, chatglm_cpu_calls):
    model = load(float_folder, dtype=torch.bfloat16).quantize(4, cpu_kernel="chatglm_cpu")
    ids = ids_of()
    with torch.no_grad():
        logits = model(ids).logits  # builds the handles of the quantized projections and the output layer
    kept = model.transformer.output_layer.backend
    assert kept.handle is not None
    data = pickle.dumps(model)
    # unpickling needs no kernel package (and a copy never shares the original's raw addresses)
    assert b"QuantizedWeight" not in data and b"FloatWeight" not in data
    assert model.transformer.output_layer.backend is kept and kept.handle is not None  # the original keeps its own
    for copied in (pickle.loads(data), copy.deepcopy(model)):
        chatglm_cpu_calls.clear()
        with torch.no_grad():
            assert torch.equal(copied(ids).logits, logits)
        assert chatglm_cpu_calls.count("float") == 1 and len(chatglm_cpu_calls) == 1 + 4 * model.config.num_layers


def test_torch_func_transforms_over_the_cpu_kernels_take_torchs_operators(float_folder, chatglm_cpu_calls):
    # vmap's batched tensors have no data pointer to hand a C kernel: the modules compute with torch's operators there.
    model = load(float_folder, dtype=torch.bfloat16).quantize(4, cpu_kernel="chatglm_cpu")
    output_layer = model.transformer.output_layer
    quantized = model.transformer.encoder.layers[0].self_attention.query_key_value
    for module in (output_layer, quantized):
        x = torch.randn(3, 2, module.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        with torch.no_grad():
            mapped = torch.func.vmap(module)(x)
            assert chatglm_cpu_calls == []
            assert relative_error(mapped.float(), module(x).float()) < 0.03  # the kernels' numerics, outside vmap
        chatglm_cpu_calls.clear()


def test_tensor_subclass_weights_and_jit_traces_take_torchs_operators(float_folder, chatglm_cpu_calls):
    from torch.testing._internal.two_tensor import TwoTensor  # a wrapper subclass, as torchao's quantized weights are

    import chatglm_cpu

    head = load(float_folder, dtype=torch.bfloat16).transformer.output_layer
    x = torch.randn(2, head.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    weight = head.weight.detach().clone()
    with torch.no_grad():
        # the kernel would read a wrapper's data pointer (0) as memory
        head.weight = torch.nn.Parameter(TwoTensor(weight, weight.clone()), requires_grad=False)
        assert torch.equal(head(x).a, torch.nn.functional.linear(x, weight)) and chatglm_cpu_calls == []
        with pytest.raises(ValueError, match=r"chatglm_cpu.FloatWeight: weight must be a plain torch.Tensor, got a TwoTensor"):
            chatglm_cpu.FloatWeight(head.weight)
        head.weight = torch.nn.Parameter(weight, requires_grad=False)
        # a trace would record the kernel's empty output, not its values: it records torch's operators
        traced = torch.jit.trace(head, x, check_trace=False)  # (its check reruns the module eagerly)
        other = torch.randn(2, head.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        assert chatglm_cpu_calls == []
        assert torch.equal(traced(other), torch.nn.functional.linear(other, weight))


@pytest.mark.parametrize("bits", [0, 4, 8])
def test_forward_mode_ad_through_the_cpu_kernels_keeps_its_tangents(float_folder, bits, chatglm_cpu_calls):
    model = load(float_folder, dtype=torch.bfloat16)
    model = model.quantize(bits, cpu_kernel="chatglm_cpu") if bits else model
    module = model.transformer.encoder.layers[0].mlp.dense_h_to_4h
    x = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tangent = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        out = torch.autograd.forward_ad.unpack_dual(module(torch.autograd.forward_ad.make_dual(x, tangent)))
    assert chatglm_cpu_calls == []  # the kernels are no differentiable operators
    # the layer is linear: its tangent is the layer (without bias) applied to the tangent, by its exact weight
    if bits:
        weight = dequantized_weight(module.released_weight(), module.weight_scale.to(tangent.dtype), bits)
    else:
        weight = module.weight
    assert torch.equal(out.tangent, torch.nn.functional.linear(tangent, weight))


def test_an_offloaded_model_keeps_no_weights_in_its_kernel_handles(float_folder, chatglm_cpu_calls):
    accelerate = pytest.importorskip("accelerate")
    reference = load(float_folder, dtype=torch.bfloat16)
    model = accelerate.cpu_offload(load(float_folder, dtype=torch.bfloat16), execution_device="cpu")
    assert model.transformer.output_layer.weight.device.type == "meta"  # the weights come in for each call
    ids = ids_of()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert "float" in chatglm_cpu_calls
    # a kept handle would hold the weights the hook brought in, all of them after one forward
    assert all(getattr(module._backend, "handle", None) is None for module in model.modules() if hasattr(module, "_backend"))


def test_an_older_chatglm_cpu_warns_and_leaves_the_matrices_to_torch(float_folder, chatglm_cpu_calls, monkeypatch, caplog):
    import chatglm_cpu

    model = load(float_folder, dtype=torch.bfloat16)
    quantization = importlib.import_module(type(model.transformer.output_layer).__module__)
    monkeypatch.setattr(chatglm_cpu, "__version__", "0.3.0")
    quantization._chatglm_cpu_or_why_not.cache_clear()
    quantization._chatglm_cpu.cache_clear()
    try:
        with torch.no_grad(), caplog.at_level("WARNING"):
            model(ids_of())
    finally:
        quantization._chatglm_cpu_or_why_not.cache_clear()
        quantization._chatglm_cpu.cache_clear()
    assert chatglm_cpu_calls == []  # no matrix on the old package (and a prompt has no decode attention)
    assert "needs chatglm_cpu 0.4 or newer, found 0.3.0" in caplog.text
    assert "pip install --force-reinstall ./cpu_kernels" in caplog.text


def test_the_output_layers_kernel_follows_its_weight_and_steps_aside_for_compile_and_autocast(float_folder, chatglm_cpu_calls):
    head = load(float_folder, dtype=torch.float16).transformer.output_layer
    x = torch.randn(1, head.in_features, dtype=torch.float16)
    with torch.no_grad():
        head(x)
        assert head.backend.handle is not None and chatglm_cpu_calls == ["float"]
        head.weight = torch.nn.Parameter(head.weight[:100])  # a view from the same address, fewer rows
        assert torch.equal(head(x), torch.nn.functional.linear(x, head.weight))
        before = weakref.ref(head.backend)
        head.float()  # converted: the handle on the old tensors goes with them
        assert before() is None
        head.half()
        chatglm_cpu_calls.clear()
        compiled = torch.compile(head, fullgraph=True, backend="eager")  # our kernel would break the graph
        assert torch.equal(compiled(x), torch.nn.functional.linear(x, head.weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast chooses torch's dtypes
            assert head(x).dtype == torch.nn.Linear(1, 1).to(torch.float16)(torch.zeros(1, 1, dtype=torch.float16)).dtype
    assert chatglm_cpu_calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_READ and per-thread fault counts are Linux's")
def test_a_checkpoint_loaded_as_stored_has_its_weight_pages_mapped_before_the_first_forward(tmp_path):
    """The first forward of the 6B int4 file took its ~3.4 GB of mapped pages as page faults in the kernels'
    threads; from_pretrained maps them on a thread instead (all but the embedding, read a row per token).
    Widths of 512 and 2048 make a 3 MB file, of which the first reads took 16 faults without this."""
    shapes = {"hidden_size": 512, "ffn_hidden_size": 2048, "num_attention_heads": 8, "kv_channels": 64}
    random_model(tmp_path / "float", VOCAB, **shapes).quantize(4).save_pretrained(tmp_path / "int4", safe_serialization=False)
    copy_code(tmp_path / "int4")
    model = load(tmp_path / "int4")
    for thread in threading.enumerate():
        if thread.name == Q.PREFAULT_THREAD_NAME:
            thread.join()
    embedding = model.get_input_embeddings().weight
    weights = [tensor for tensor in model.parameters() if tensor is not embedding]
    assert page_faults_reading(weights) == 0


def test_the_prefault_thread_is_stopped_before_the_interpreter_shuts_down(tmp_path):
    """A process that exited right after loading (the CLI refusing an option) aborted now and then, its mapping
    thread ended mid-call by the shutting-down interpreter; at-exit handlers now find it stopped and joined."""
    shapes = {"hidden_size": 512, "ffn_hidden_size": 2048, "num_attention_heads": 8, "kv_channels": 64}
    random_model(tmp_path / "float", VOCAB, **shapes).quantize(4).save_pretrained(tmp_path / "int4")
    copy_code(tmp_path / "int4")
    script = f"""
import atexit, threading
from transformers import AutoModel
# Registered before loading, so it runs after every handler the load registers.
prefaulting = lambda: [t.name for t in threading.enumerate() if t.name == {Q.PREFAULT_THREAD_NAME!r}]
atexit.register(lambda: print("alive at exit:", prefaulting()))
AutoModel.from_pretrained({str(tmp_path / "int4")!r}, trust_remote_code=True)
print("started:", prefaulting())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if "started: []" in result.stdout:
        pytest.skip("the mapping thread finished before the script exited: nothing left to stop")
    assert "alive at exit: []" in result.stdout
