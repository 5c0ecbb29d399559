"""The ChatGLM2 network (spec §3): released layout, exact math, cache, generation and precision."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from reference_chatglm2 import reference_logits
from tiny_checkpoint import random_model, write_config, write_released_shards, copy_code

VOCAB = 160


def load(folder, **kwargs):
    return AutoModel.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


@pytest.fixture(scope="module")
def released_folder(tmp_path_factory):
    """A tiny model saved exactly as the fp16 release is laid out: sharded .bin files plus an index."""
    folder = tmp_path_factory.mktemp("released")
    model = random_model(folder, VOCAB, add_qkv_bias=True)
    write_released_shards(model.state_dict(), folder, num_shards=3)
    return folder


@pytest.fixture(scope="module")
def model(released_folder):
    return load(released_folder)


def prompt_ids(batch=1, length=9, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def test_released_sharded_bin_loads_without_missing_or_unexpected_keys(released_folder):
    loaded, info = AutoModel.from_pretrained(released_folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for shard in sorted(released_folder.glob("pytorch_model-*.bin")):
        for name, tensor in torch.load(shard, weights_only=True).items():
            assert torch.equal(loaded.state_dict()[name], tensor), name


def test_state_dict_names_and_shapes_follow_the_release(model):
    names = set(model.state_dict())
    expected = {
        "transformer.embedding.word_embeddings.weight",
        "transformer.rotary_pos_emb.inv_freq",
        "transformer.encoder.final_layernorm.weight",
        "transformer.output_layer.weight",
    }
    per_layer = (
        "input_layernorm.weight",
        "self_attention.query_key_value.weight",
        "self_attention.query_key_value.bias",
        "self_attention.dense.weight",
        "post_attention_layernorm.weight",
        "mlp.dense_h_to_4h.weight",
        "mlp.dense_4h_to_h.weight",
    )
    for layer in range(model.config.num_layers):
        expected |= {f"transformer.encoder.layers.{layer}.{suffix}" for suffix in per_layer}
    assert names == expected
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["transformer.encoder.layers.0.self_attention.query_key_value.weight"] == (4 * 16 + 2 * 2 * 16, 64)
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (2 * 96, 64)
    assert shapes["transformer.rotary_pos_emb.inv_freq"] == (4,)
    expected_inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    assert torch.allclose(model.state_dict()["transformer.rotary_pos_emb.inv_freq"], expected_inv_freq)


def test_safetensors_save_reloads_bit_for_bit(model, tmp_path):
    model.save_pretrained(tmp_path)
    copy_code(tmp_path)
    reloaded = load(tmp_path)
    assert list((tmp_path).glob("*.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("multi_query", [True, False])
def test_forward_matches_independent_reference(tmp_path, multi_query):
    model = random_model(tmp_path, VOCAB, add_qkv_bias=True, multi_query_attention=multi_query)
    ids = prompt_ids(batch=2, length=11)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    expected = reference_logits(model.state_dict(), model.config.to_dict(), ids, padding_mask=mask)
    logits = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)


def test_eager_and_sdpa_attention_agree(released_folder):
    eager = load(released_folder, attn_implementation="eager")
    sdpa = load(released_folder, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids = prompt_ids(batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    torch.testing.assert_close(eager(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)


def test_position_ids_change_the_output_and_are_honoured(model):
    ids = prompt_ids()
    default = model(ids).logits
    explicit = model(ids, position_ids=torch.arange(ids.shape[1])[None]).logits
    shifted = model(ids, position_ids=torch.arange(ids.shape[1])[None] + 5).logits
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, shifted)


def test_outputs_at_real_positions_do_not_depend_on_padding(model):
    ids = prompt_ids(length=6)
    alone = model(ids).logits
    padded_ids = torch.cat((torch.zeros(1, 4, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)), dim=1)
    padded = model(padded_ids, attention_mask=mask).logits
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, 4:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("given_positions", [False, True], ids=["positions-from-mask", "tokenizer-positions"])
def test_right_padding_keeps_the_real_tokens_logits_and_loss(model, given_positions):
    """Right padding, as training tools ask for it: the real tokens keep positions 0..n-1 (from the mask
    when no position_ids are given, as with LLaMA-Factory's collator), so their logits and the loss over
    them are those of the unpadded rows."""
    rows = [prompt_ids(length=7, seed=2)[0], prompt_ids(length=4, seed=3)[0]]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    labels = torch.full((2, 7), -100)
    positions = torch.zeros(2, 7, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)], mask[row, : len(tokens)], labels[row, : len(tokens)] = tokens, 1, tokens
        positions[row, : len(tokens)] = torch.arange(len(tokens))
    extra = {"position_ids": positions} if given_positions else {}
    padded = model(ids, attention_mask=mask, labels=labels, **extra)
    losses, counts = [], []
    for row, tokens in enumerate(rows):
        alone = model(tokens[None], labels=tokens[None])
        torch.testing.assert_close(padded.logits[row, : len(tokens)], alone.logits[0], rtol=1e-5, atol=1e-5)
        losses.append(alone.loss * (len(tokens) - 1))
        counts.append(len(tokens) - 1)
    torch.testing.assert_close(padded.loss, sum(losses) / sum(counts), rtol=1e-5, atol=1e-5)


def test_generate_with_right_padding_warns_as_transformers_does_for_decoder_only_models(model):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    ids = torch.cat((prompt_ids(batch=2, length=4), torch.zeros(2, 2, dtype=torch.long)), dim=1)
    ids[0, 4:] = prompt_ids(length=2, seed=4)
    mask = (ids != 0).long()
    mask[0] = 1
    with CaptureLogger(transformers_logging.get_logger("transformers.generation.utils")) as captured:
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    assert "right-padding was detected" in captured.out


def test_cached_incremental_decoding_equals_full_forward(model):
    ids = prompt_ids(length=12)
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    cache = cache_of(out)
    pieces = [out.logits]
    for step in range(5, 12, 3):
        chunk = ids[:, step : step + 3]
        out = model(chunk, past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def test_kv_cache_holds_only_the_key_value_groups(model):
    ids = prompt_ids(length=10)
    cache = cache_of(model(ids, use_cache=True))
    config = model.config
    cached_bytes = 0
    for layer in range(config.num_layers):
        for tensor in _layer_tensors(cache, layer):
            assert tensor.shape == (1, config.multi_query_group_num, 10, config.kv_channels)
            cached_bytes += tensor.numel() * tensor.element_size()
    assert cached_bytes == config.num_layers * 2 * config.multi_query_group_num * config.kv_channels * 10 * 4


def _layer_tensors(cache, layer):
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def test_float16_rotary_tables_are_computed_in_float32(model):
    rotary = model.transformer.rotary_pos_emb
    positions = torch.tensor([[2049, 3001, 30000]])
    cos, sin = rotary(positions, torch.float16)
    angles = positions[..., None].double() * rotary.inv_freq.double()
    assert cos.dtype == torch.float16
    torch.testing.assert_close(cos, angles.cos().half(), rtol=0, atol=1e-3)
    torch.testing.assert_close(sin, angles.sin().half(), rtol=0, atol=1e-3)


def test_greedy_generate_continues_the_model_argmax(model):
    ids = prompt_ids()
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    sequence = ids
    for _ in range(6):
        next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat((sequence, next_token), dim=1)
    assert torch.equal(generated, sequence)


def test_generate_without_cache_matches_with_cache(model):
    ids = prompt_ids()
    with_cache = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    without = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("spelling", ["past_key_values", "cache"])
def test_generate_accepts_a_dynamic_cache_under_either_name(model, spelling):
    from transformers import DynamicCache

    ids = prompt_ids()
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    given = DynamicCache()
    output = model.generate(ids, max_new_tokens=6, do_sample=False, **{spelling: given})
    assert torch.equal(output, expected)
    assert given.get_seq_length() == expected.shape[1] - 1


def test_static_cache_generates_what_the_dynamic_cache_does(model):
    """A static cache (what torch.compile of decode needs) hands every layer all its slots; transformers
    builds a 4D mask for it."""
    short, long = prompt_ids(length=5, seed=2), prompt_ids(length=9, seed=3)
    ids = torch.cat((torch.cat((torch.zeros(1, 4, dtype=torch.long), short), dim=1), long), dim=0)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for kwargs in ({"input_ids": long}, {"input_ids": ids, "attention_mask": mask}):
        expected = model.generate(**kwargs, max_new_tokens=6, do_sample=False)
        static = model.generate(**kwargs, max_new_tokens=6, do_sample=False, cache_implementation="static")
        assert torch.equal(static, expected)


def test_left_padded_batch_generates_what_each_prompt_does_alone(model):
    short, long = prompt_ids(length=5, seed=2), prompt_ids(length=9, seed=3)
    ids = torch.cat((torch.zeros(1, 4, dtype=torch.long), short), dim=1)
    ids = torch.cat((ids, long), dim=0)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = model.generate(ids, attention_mask=mask, position_ids=positions, max_new_tokens=6, do_sample=False)
    alone_short = model.generate(short, max_new_tokens=6, do_sample=False)
    alone_long = model.generate(long, max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[0, 4:], alone_short[0])
    assert torch.equal(batched[1], alone_long[0])


def test_given_position_ids_are_continued_during_generation(model):
    ids = prompt_ids(length=6)
    offset = 7
    positions = torch.arange(6)[None] + offset
    generated = model.generate(ids, position_ids=positions, max_new_tokens=4, do_sample=False)
    sequence = ids
    for _ in range(4):
        steps = torch.arange(sequence.shape[1])[None] + offset
        next_token = model(sequence, position_ids=steps).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat((sequence, next_token), dim=1)
    assert torch.equal(generated, sequence)


def test_beam_search_and_sampling_run_and_respect_max_new_tokens(model):
    ids = prompt_ids()
    beams = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False)
    assert beams.shape == (1, ids.shape[1] + 5)
    torch.manual_seed(0)
    first = model.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.8, temperature=0.8)
    torch.manual_seed(0)
    second = model.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.8, temperature=0.8)
    assert torch.equal(first, second) and first.shape == (1, ids.shape[1] + 5)


def test_generation_stops_at_eos(model):
    ids = prompt_ids()
    first = model.generate(ids, max_new_tokens=1, do_sample=False)[0, -1].item()
    stopped = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=first)
    assert stopped.shape[1] == ids.shape[1] + 1


def test_hidden_states_and_tuple_outputs(model):
    ids = prompt_ids()
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_layers + 1
    base = model.transformer(ids, output_hidden_states=True)
    assert base.last_hidden_state.shape == (1, ids.shape[1], model.config.hidden_size)  # [batch, seq, hidden]
    torch.testing.assert_close(base.hidden_states[0], model.transformer.embedding(ids))
    # The README promises the last entry is taken after the final norm, as in transformers models.
    torch.testing.assert_close(base.hidden_states[-1], base.last_hidden_state)
    as_tuple = model(ids, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], out.logits)
    attentions = model(ids, output_attentions=True).attentions
    assert len(attentions) == model.config.num_layers
    heads, length = model.config.num_attention_heads, ids.shape[1]
    assert all(a.shape == (1, heads, length, length) for a in attentions)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(1, heads, length))


def test_tuple_outputs_are_the_set_fields_in_order_and_follow_the_config(model):
    # As transformers' models return them: loss first where labels were given, then what was asked for.
    ids = prompt_ids()
    out = model(ids, labels=ids, output_hidden_states=True)
    loss, logits, cache, hidden_states = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
    assert cache.get_seq_length() == ids.shape[1]
    assert len(hidden_states) == model.config.num_layers + 1
    (last_hidden_state,) = model.transformer(ids, use_cache=False, return_dict=False)
    torch.testing.assert_close(last_hidden_state, model.transformer(ids).last_hidden_state)
    model.config.return_dict = False
    try:
        assert isinstance(model(ids, use_cache=False), tuple)
        assert not isinstance(model(ids, use_cache=False, return_dict=True), tuple)
    finally:
        model.config.return_dict = True


def test_logits_to_keep_computes_only_the_last_positions(model):
    ids = prompt_ids()
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(model(ids, return_last_logit=True).logits, last)


@pytest.mark.parametrize("dtype_argument", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_tracks_float32(released_folder, model, dtype, dtype_argument):
    half = load(released_folder, **{dtype_argument: dtype})
    assert half.dtype == dtype
    ids = prompt_ids()
    logits = half(ids).logits.float()
    reference = model(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    moved = load(released_folder).to(dtype)
    assert moved.dtype == dtype
    assert (moved(ids).logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_the_float32_formula_bit_for_bit(model, dtype):
    generator = torch.Generator().manual_seed(0)
    norm = type(model.transformer.encoder.layers[0].input_layernorm)(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=generator) + 0.5)
    x = (torch.randn(3, 5, 64, generator=generator) * 3).to(dtype)
    wide = x.float()
    expected = (norm.weight.float() * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-5))).to(dtype)
    assert torch.equal(norm(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cpu_decode_step_attends_in_float32_without_sdpa_and_a_float16_prompt_in_float32(released_folder, model, dtype, monkeypatch):
    """Torch's CPU SDPA takes one query several times longer in half precision than in float32, and even in
    float32 longer than two grouped matmuls (4x at 2000 keys): a decode step takes the matmuls in float32,
    the prompt SDPA in bfloat16, or for float16 (over twice as slow as float32 there too) in float32, and the
    step still tracks the float32 model."""
    half = load(released_folder, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def recording_sdpa(query, *args, **kwargs):
        seen.append((query.shape[2], query.dtype))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    ids = prompt_ids(length=6)
    prompt = half(ids[:, :5], use_cache=True)
    step = half(ids[:, 5:], past_key_values=cache_of(prompt), use_cache=True)
    assert seen == [(5, torch.float32 if dtype == torch.float16 else dtype)] * half.config.num_layers
    assert step.logits.dtype == dtype
    reference = model(ids).logits[:, 5:]
    assert (step.logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rotation_by_per_dim_tables_is_the_pairwise_rotation_bit_for_bit(model, dtype):
    # Half precision rounds each product before the sum; the four-operator form must round the same way.
    modeling = sys.modules[type(model).__module__]
    generator = torch.Generator().manual_seed(3)
    states = (torch.randn(2, 5, 6, 16, generator=generator) * 4).to(dtype)
    angles = torch.rand(2, 5, 4, generator=generator) * 100  # rotary_dim 8 of head_dim 16
    cos, sin = angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]
    even, odd = states[..., 0:8:2], states[..., 1:8:2]
    expected = torch.cat((torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2), states[..., 8:]), -1)
    rotated = modeling.apply_rotary_pos_emb(states, *modeling.rotary_tables(cos, sin, 16))
    assert rotated.dtype == dtype and torch.equal(rotated, expected)


@pytest.mark.parametrize("groups", [2, 8])  # multi-query groups; one key head per query head
def test_single_query_cpu_attention_is_the_eager_attention(model, groups):
    modeling = sys.modules[type(model).__module__]
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(3, 8, 1, 16, generator=generator)
    key, value = (torch.randn(3, groups, 11, 16, generator=generator) for _ in range(2))
    mask = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of the first sequence
    attention = type("Attention", (), {"num_key_value_groups": 8 // groups, "query_key_layer_scaling": False, "training": False})
    for attention_mask in (mask, None):
        expected, _ = modeling.eager_attention_forward(attention, query, key, value, attention_mask, 0.25)
        context = modeling.single_query_attention_on_cpu(query, key, value, attention_mask, 0.25)
        torch.testing.assert_close(context, expected, rtol=1e-6, atol=1e-6)


def test_left_padded_batch_decodes_alike_with_eager_and_sdpa(released_folder):
    eager = load(released_folder, attn_implementation="eager")
    sdpa = load(released_folder, attn_implementation="sdpa")
    ids = prompt_ids(batch=2, length=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    steps = []
    for model in (eager, sdpa):
        prompt = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps.append(model(ids[:, 6:], attention_mask=mask, past_key_values=cache_of(prompt), use_cache=True).logits)
    torch.testing.assert_close(steps[0], steps[1])


def test_half_method_and_device_map_auto(released_folder):
    ids = prompt_ids()
    reference = load(released_folder)(ids).logits
    half = load(released_folder).half()
    assert half.dtype == torch.float16
    assert (half(ids).logits.float() - reference).abs().max() < 0.05 * reference.abs().max()
    mapped = load(released_folder, device_map="auto")
    assert torch.equal(mapped(ids).logits, reference)


def test_labels_give_the_shifted_cross_entropy(model):
    ids = prompt_ids(length=8)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_gradient_checkpointing_gives_the_same_gradients(released_folder):
    ids = prompt_ids(length=8)
    grads = []
    for checkpointing in (False, True):
        model = load(released_folder).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_gradient_checkpointing_recomputes_every_layer_in_backward(released_folder):
    """Counts MLP calls: once per layer without checkpointing, twice (forward, then recomputation in
    backward) with it; a checkpointing switch that silently does nothing fails here."""
    ids = prompt_ids(length=8)
    for checkpointing, calls_per_layer in ((False, 1), (True, 2)):
        model = load(released_folder).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = []
        for layer in model.transformer.encoder.layers:
            layer.mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        model(ids, labels=ids).loss.backward()
        assert len(calls) == calls_per_layer * model.config.num_layers


def test_import_has_no_global_side_effects(tmp_path):
    copy_code(tmp_path)
    write_config(tmp_path, VOCAB)
    script = f"""
import torch, sys
flags = (torch._C._jit_can_fuse_on_cpu(), torch._C._jit_can_fuse_on_gpu(), torch._C._jit_texpr_fuser_enabled(),
         torch._C._get_graph_executor_optimize(), torch.is_grad_enabled(), torch.get_default_dtype(),
         torch.get_num_threads())
from transformers import AutoConfig, AutoModel
config = AutoConfig.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
AutoModel.from_config(config, trust_remote_code=True)
after = (torch._C._jit_can_fuse_on_cpu(), torch._C._jit_can_fuse_on_gpu(), torch._C._jit_texpr_fuser_enabled(),
         torch._C._get_graph_executor_optimize(), torch.is_grad_enabled(), torch.get_default_dtype(),
         torch.get_num_threads())
assert flags == after, (flags, after)
"""
    before = set(p.name for p in tmp_path.iterdir())
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert set(p.name for p in tmp_path.iterdir()) == before


def test_bad_inputs_get_clear_errors(model):
    with pytest.raises(ValueError, match="exactly one of"):
        model(None)
    with pytest.raises(ValueError, match="attention_mask"):
        model(prompt_ids(length=5), attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="Cache"):
        model(prompt_ids(length=5), past_key_values=((torch.zeros(1),),))


def test_causal_lm_auto_class_is_the_same_model(released_folder):
    causal = AutoModelForCausalLM.from_pretrained(released_folder, trust_remote_code=True).eval()
    assert type(causal).__name__ == "ChatGLMForConditionalGeneration"
    ids = prompt_ids()
    assert torch.equal(causal(ids).logits, load(released_folder)(ids).logits)
