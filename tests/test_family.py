"""The GLM 6B family: the seven released config.json files, their rotary variants, CodeGeeX2's keys.

The configs are rebuilt from /work/shared/glm-family.md (§0-§4): each release's config.json is
chatglm2-6b's with the listed differences. Each one loads through AutoConfig with
trust_remote_code and, with its sizes shrunk, builds a model that runs. The rotary variants are
checked against formulas written here from the facts file, not against the package's code:

- chatglm2-6b-32k (`rope_ratio` 16): angle = (position / 16) * 10000 ** (-2i / d);
- chatglm3-6b-32k (50) and -128k (500): angle = position * (10000 * ratio) ** (-2i / d).
"""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from reference_chatglm2 import reference_logits
from tiny_checkpoint import REPO_ROOT, TINY_SHAPES, copy_code, model_from_config, write_released_shards

VOCAB = 160

CHATGLM2_6B = {
    **json.loads((REPO_ROOT / "config.json").read_text()),
    "_name_or_path": "THUDM/chatglm2-6b",
    "transformers_version": "4.27.1",
}
_NO_CLASSIFIER = {k: v for k, v in CHATGLM2_6B["auto_map"].items() if k != "AutoModelForSequenceClassification"}


def _release(name, drop=(), **changes):
    config = {**copy.deepcopy(CHATGLM2_6B), "_name_or_path": f"THUDM/{name}", **changes}
    for key in drop:
        del config[key]
    return config


RELEASED_CONFIGS = {
    "chatglm2-6b": CHATGLM2_6B,
    "chatglm2-6b-32k": _release("chatglm2-6b-32k", rope_ratio=16, auto_map=_NO_CLASSIFIER),
    "chatglm3-6b": _release("chatglm3-6b", seq_length=8192, transformers_version="4.30.2"),
    # Not found in a public mirror; the [G3] model table gives 8k and the modeling code is chatglm3-6b's.
    "chatglm3-6b-base": _release("chatglm3-6b-base", seq_length=8192, transformers_version="4.30.2"),
    "chatglm3-6b-32k": _release("chatglm3-6b-32k", seq_length=32768, rope_ratio=50, transformers_version="4.30.2"),
    "chatglm3-6b-128k": _release(
        "chatglm3-6b-128k", seq_length=131072, rope_ratio=500, transformers_version="4.30.2"
    ),
    "codegeex2-6b": _release(
        "codegeex2-6b",
        drop=("pad_token_id",),
        seq_length=8192,
        torch_dtype="bfloat16",
        transformers_version="4.30.2",
        interleaved_qkv=False,
        rotary_percent=0.5,
        auto_map=_NO_CLASSIFIER,
    ),
}

# release -> (rope_ratio_applies_to, rotary base, position divisor), from the facts file.
ROTARY = {
    "chatglm2-6b": (None, 10000.0, 1.0),
    "chatglm2-6b-32k": ("positions", 10000.0, 16.0),
    "chatglm3-6b": (None, 10000.0, 1.0),
    "chatglm3-6b-base": (None, 10000.0, 1.0),
    "chatglm3-6b-32k": ("base", 500000.0, 1.0),
    "chatglm3-6b-128k": ("base", 5000000.0, 1.0),
    "codegeex2-6b": (None, 10000.0, 1.0),
}


def write_release(folder, name, shrink=True, **changes):
    """A folder holding the package's code and release `name`'s config.json (tiny shapes if `shrink`)."""
    config = copy.deepcopy(RELEASED_CONFIGS[name])
    if shrink:
        config.update({k: v for k, v in TINY_SHAPES.items() if k not in ("seq_length", "torch_dtype")})
        config["padded_vocab_size"] = VOCAB
    config.update(changes)
    copy_code(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_config(folder, **kwargs):
    return AutoConfig.from_pretrained(folder, trust_remote_code=True, **kwargs)


def tiny_model(folder, dtype=torch.float32, seed=0):
    return model_from_config(load_config(folder), seed).to(dtype)


def reference_angles(positions, rotary_dim, base, divisor):
    """The facts file's formula, in float64: (position / divisor) * base ** (-2i / rotary_dim)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return (positions.double()[..., None] / divisor) * base ** (-exponents)


@pytest.mark.parametrize("name", sorted(RELEASED_CONFIGS))
def test_released_config_loads_unchanged_and_knows_its_rotary_variant(tmp_path, name):
    write_release(tmp_path, name, shrink=False)
    config = load_config(tmp_path)
    release = RELEASED_CONFIGS[name]
    for key in ("seq_length", "padded_vocab_size", "hidden_size", "num_layers", "multi_query_group_num"):
        assert getattr(config, key) == release[key], key
    assert config.rope_ratio == release.get("rope_ratio", 1)
    assert config.rope_ratio_applies_to == ROTARY[name][0]
    assert config.max_position_embeddings == release["seq_length"]


@pytest.mark.parametrize("name", sorted(RELEASED_CONFIGS))
def test_released_config_builds_a_tiny_model_that_runs(tmp_path, name):
    write_release(tmp_path, name)
    dtype = torch.bfloat16 if name == "codegeex2-6b" else torch.float32
    model = tiny_model(tmp_path, dtype=dtype)
    _, base, divisor = ROTARY[name]
    assert (model.transformer.rotary_pos_emb.base, model.transformer.rotary_pos_emb.position_divisor) == (base, divisor)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    assert logits.shape == (2, 7, VOCAB) and logits.dtype == dtype and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm2-6b-32k", "chatglm3-6b-32k", "chatglm3-6b-128k"])
@pytest.mark.parametrize("positions", [[0, 1, 2047, 2049, 4099], [32767, 32769, 40000, 65537, 131071]])
def test_rotary_tables_follow_the_release_formula_past_2048_and_32768(tmp_path, name, positions):
    write_release(tmp_path, name, kv_channels=128)  # the released head size: 32 frequency pairs
    rotary = tiny_model(tmp_path).transformer.rotary_pos_emb
    positions = torch.tensor([positions])
    _, base, divisor = ROTARY[name]
    expected = reference_angles(positions, 64, base, divisor)
    cos, sin = rotary(positions, torch.float32)
    # float32 positions times float32 frequencies: a few ulps of the angle (131071 * 2**-23 = 0.016).
    atol = 4 * positions.max().item() * 2**-24 + 1e-6
    torch.testing.assert_close(cos.double(), expected.cos(), rtol=0, atol=atol)
    torch.testing.assert_close(sin.double(), expected.sin(), rtol=0, atol=atol)
    half_cos, _ = rotary(positions, torch.float16)
    assert half_cos.dtype == torch.float16
    torch.testing.assert_close(half_cos.double(), expected.cos(), rtol=0, atol=atol + 1e-3)


def test_the_two_meanings_of_rope_ratio_compute_different_angles(tmp_path):
    """Guards against reading both releases one way (what vLLM and llama.cpp do for chatglm2-6b-32k)."""
    positions = torch.tensor([[5000, 40000]])
    write_release(tmp_path / "a", "chatglm2-6b-32k", kv_channels=128)
    write_release(tmp_path / "b", "chatglm2-6b-32k", kv_channels=128, rope_ratio_applies_to="base")
    divided, _ = tiny_model(tmp_path / "a").transformer.rotary_pos_emb(positions, torch.float32)
    scaled, _ = tiny_model(tmp_path / "b").transformer.rotary_pos_emb(positions, torch.float32)
    assert (divided - scaled).abs().max() > 0.5


@pytest.mark.parametrize("name", ["chatglm2-6b", "chatglm2-6b-32k", "chatglm3-6b-32k", "chatglm3-6b-128k"])
def test_released_layout_checkpoint_matches_the_reference_forward_at_long_positions(tmp_path, name):
    """Saved as the release saves (sharded .bin, `inv_freq` in float16), loaded, compared with the reference."""
    write_release(tmp_path, name)
    model = tiny_model(tmp_path)
    state = model.state_dict()
    # Sharpen attention (std 0.02 weights leave it nearly uniform, blind to positions).
    for key in state:
        if key.endswith("query_key_value.weight"):
            state[key] = state[key] * 12
    state["transformer.rotary_pos_emb.inv_freq"] = state["transformer.rotary_pos_emb.inv_freq"].half()
    write_released_shards(state, tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    config = json.loads((tmp_path / "config.json").read_text())
    _, base, divisor = ROTARY[name]
    for start in (2046, 40000, 129000):
        # Spread out, so that the relative angles (all attention sees) span every frequency.
        positions = start + torch.tensor([[0, 3, 50, 400, 1500, 2040]])
        with torch.no_grad():
            logits = loaded(ids, position_ids=positions).logits
        expected = reference_logits(state, config, ids, positions, rotary_base=base, position_divisor=divisor)
        torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)
        # The comparison sees the angles: another base gives other logits.
        other = reference_logits(state, config, ids, positions, rotary_base=2 * base, position_divisor=divisor)
        assert (other - expected).abs().max() > 0.03


@pytest.mark.parametrize("name_or_path", ["", "my-finetune", "/data/models/glm-long", "THUDM/glm-4-9b"])
def test_rope_ratio_without_a_known_release_is_refused_naming_the_field(tmp_path, name_or_path):
    write_release(tmp_path, "chatglm2-6b-32k", _name_or_path=name_or_path)
    with pytest.raises(ValueError, match="rope_ratio_applies_to must be set.*'positions'.*'base'"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "name_or_path, applies_to",
    [
        ("/home/me/chatglm2-6b-32k", "positions"),
        ("/home/me/chatglm3-6b-32k/", "base"),
        ("zai-org/chatglm3-6b-128k", "base"),
        ("THUDM/codegeex2-6b", "positions"),
    ],
)
def test_release_is_recognised_by_the_last_path_component(tmp_path, name_or_path, applies_to):
    write_release(tmp_path, "chatglm2-6b-32k", _name_or_path=name_or_path)
    assert load_config(tmp_path).rope_ratio_applies_to == applies_to


def test_explicit_field_wins_and_is_saved(tmp_path):
    write_release(tmp_path, "chatglm2-6b-32k", _name_or_path="my-finetune", rope_ratio_applies_to="base")
    config = load_config(tmp_path)
    assert config.rope_ratio_applies_to == "base"
    inferred = load_config(write_release(tmp_path / "inferred", "chatglm3-6b-128k"))
    saved = tmp_path / "saved"
    inferred.save_pretrained(saved)
    written = json.loads((saved / "config.json").read_text())
    assert (written["rope_ratio"], written["rope_ratio_applies_to"]) == (500, "base")


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"rope_ratio_applies_to": "linear"}, "rope_ratio_applies_to"),
        ({"rope_ratio": 0}, "rope_ratio"),
        ({"rope_ratio": "16"}, "rope_ratio"),
        ({"rope_ratio": True}, "rope_ratio"),
        ({"rotary_percent": 1.0}, "rotary_percent"),
        ({"interleaved_qkv": True}, "interleaved_qkv"),
    ],
)
def test_invalid_rotary_settings_are_refused_naming_the_field(tmp_path, changes, named):
    write_release(tmp_path, "codegeex2-6b", **changes)
    with pytest.raises(ValueError, match=f"ChatGLMConfig.{named} must"):
        load_config(tmp_path)


def test_rope_ratio_one_needs_no_choice(tmp_path):
    write_release(tmp_path, "chatglm2-6b", _name_or_path="anything", rope_ratio=1)
    config = load_config(tmp_path)
    assert (config.rope_ratio, config.rope_ratio_applies_to) == (1, None)


def test_codegeex2_config_keeps_its_keys_and_has_no_pad_token(tmp_path):
    config = load_config(write_release(tmp_path, "codegeex2-6b", shrink=False))
    assert (config.rotary_percent, config.interleaved_qkv) == (0.5, False)
    assert getattr(config, "pad_token_id", None) is None  # 5.x has no class default for it
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # 5.x renamed it
    assert dtype in (torch.bfloat16, "bfloat16")


def test_codegeex2_bfloat16_rmsnorm_upcasts_to_float32(tmp_path):
    """The package's choice (see ChatGLMConfig): the norm of a bfloat16 model is the float32 one, rounded."""
    model = tiny_model(write_release(tmp_path, "codegeex2-6b"), dtype=torch.bfloat16)
    norm = model.transformer.encoder.final_layernorm
    hidden = (torch.randn(3, 5, 64) * 30).to(torch.bfloat16)
    h = hidden.float()
    upcast = (norm.weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps))).bfloat16()
    assert torch.equal(norm(hidden), upcast)


def test_codegeex2_generates_from_a_language_header_prompt(tmp_path, sentencepiece_model_path):
    """CodeGeeX2's README prompt ("# language: Python" header, greedy), with no pad_token_id in the config."""
    import shutil

    from transformers import AutoTokenizer

    folder = write_release(tmp_path, "codegeex2-6b", padded_vocab_size=2048)
    shutil.copy(sentencepiece_model_path, folder / "tokenizer.model")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    tiny_model(folder, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    prompt = "# language: Python\n# write a bubble sort function\n"
    inputs = tokenizer([prompt], return_tensors="pt")
    assert inputs["input_ids"][0, :2].tolist() == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True) == prompt

    as_stored = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto").eval()
    assert as_stored.dtype == torch.bfloat16
    out = as_stored.generate(**inputs, max_new_tokens=4, do_sample=False, top_k=1)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, top_k=1)
    sequence = inputs["input_ids"]
    while sequence.shape[1] < out.shape[1]:
        step = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat((sequence, step), dim=1)
    assert torch.equal(out, sequence)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5 or out[0, -1].item() == 2
