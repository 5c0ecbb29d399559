"""Weight-only INT8 / INT4 quantization (`quantization.py`, spec section 6).

The module is loaded from its file, as transformers loads remote code, so these tests need no
package layout. Triton kernels are tested separately (tests/test_triton_kernels.py).
"""

import copy
import importlib.util
import io
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantization_helpers import (
    Q,
    chatglm_cpu_runs,
    dequantized_weight,
    load_quantization,
    page_faults_reading,
    released_bytes,
    released_integers,
)

# (out_features, in_features): shapes the CPU kernels take, and shapes only the fallback takes
# (40 rows are not a multiple of 16; 66 inputs are not a multiple of 16 or 32).
KERNEL_SHAPE = (48, 64)
ODD_SHAPE = (40, 66)


def make_layer(out_features, in_features, bits, dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    return Q.QuantizedLinear.from_linear(linear.to(dtype), bits)


def reference_output(layer, x):
    """float32 F.linear with the released weight dequantized by the tests' own integer arithmetic: what every
    compute path must agree with."""
    weight = dequantized_weight(layer.released_weight(), layer.weight_scale.float(), layer.bits)
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), weight, bias)


def exact_output(layer, x):
    """What the exact path gives, bit for bit: the weight dequantized (by the tests' integer arithmetic) to x's
    dtype, then F.linear in that dtype."""
    weight = dequantized_weight(layer.released_weight(), layer.weight_scale.to(x.dtype), layer.bits)
    return F.linear(x, weight, layer.bias.to(x.dtype) if layer.bias is not None else None)


def assert_close_relative(actual, expected, tolerance):
    """Elementwise error within `tolerance` times the largest expected magnitude."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, rtol=0, atol=tolerance * scale)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_pack_int4_puts_even_column_in_high_nibble_as_signed_twos_complement():
    q = torch.tensor([[-8, 7, -7, 0, 1, -1], [0, -8, 7, 7, -1, 1]], dtype=torch.int8)
    packed = Q.pack_int4(q)
    expected_bytes = [[0x87, 0x90, 0x1F], [0x08, 0x77, 0xF1]]
    assert packed.dtype == torch.int8
    assert packed.view(torch.uint8).tolist() == expected_bytes


def test_unpack_int4_reads_every_byte_back_to_its_two_nibbles():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).view(16, 16)
    q = Q.unpack_int4(every_byte)
    assert q.shape == (16, 32) and q.dtype == torch.int8
    assert torch.equal(q.to(torch.int32), released_integers(every_byte, 4))
    assert torch.equal(Q.pack_int4(q), every_byte)
    assert torch.equal(released_bytes(q, 4), every_byte)  # the tests' own packing agrees


def test_pack_unpack_round_trip_on_odd_row_counts():
    q = torch.randint(-8, 8, (7, 10), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(Q.unpack_int4(Q.pack_int4(q)), q)


def test_pack_int4_rejects_odd_width_out_of_range_values_and_non_int8():
    with pytest.raises(ValueError, match="even"):
        Q.pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        Q.pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        Q.pack_int4(torch.zeros(2, 2, dtype=torch.int32))


def test_quantized_projection_names_the_projection_of_a_weight_key_and_nothing_else():
    assert Q.quantized_projection("transformer.encoder.layers.27.mlp.dense_4h_to_h.weight") == "mlp.dense_4h_to_h"
    assert Q.quantized_projection("encoder.layers.0.self_attention.query_key_value.weight") == "self_attention.query_key_value"
    for key in (
        "transformer.encoder.layers.0.self_attention.query_key_value.bias",
        "transformer.encoder.layers.0.self_attention.query_key_value.weight_scale",
        "transformer.encoder.layers.0.input_layernorm.weight",
        "transformer.output_layer.weight",
        "transformer.encoder.layers.x.mlp.dense_h_to_4h.weight",
        "my_encoder.layers.0.mlp.dense_h_to_4h.weight",
    ):
        assert Q.quantized_projection(key) is None, key
    assert all(Q.quantized_projection(f"encoder.layers.3.{path}.weight") == path for path in Q.QUANTIZED_PROJECTIONS)


# ---------------------------------------------------------------------------------------------
# quantize_weight / dequantize_weight
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_weight_is_each_released_integer_times_its_row_scale(bits, dtype):
    generator = torch.Generator().manual_seed(3)
    top = 7 if bits == 4 else 127
    q = torch.randint(-top - 1, top + 1, (6, 16), dtype=torch.int8, generator=generator)
    scale = (torch.rand(6, generator=generator) + 0.01).to(dtype)
    released = released_bytes(q, bits)
    assert torch.equal(Q.dequantize_weight(released, scale, bits), dequantized_weight(released, scale, bits))


def test_quantize_weight_int8_uses_absmax_over_127_and_round_half_to_even():
    weight = torch.tensor([[127.0, -63.5, 31.75, 0.0], [254.0, 1.0, -3.0, 2.0]])
    qweight, scale = Q.quantize_weight(weight, 8)
    assert scale.tolist() == [1.0, 2.0]
    assert qweight.dtype == torch.int8
    assert qweight.tolist() == [[127, -64, 32, 0], [127, 0, -2, 1]]


def test_quantize_weight_int4_uses_absmax_over_7_and_packs_the_release_layout():
    weight = torch.tensor([[7.0, -3.5, 1.75, 0.0], [-14.0, 2.0, 6.0, -7.0]])
    qweight, scale = Q.quantize_weight(weight, 4)
    assert scale.tolist() == [1.0, 2.0]
    # q = [[7, -4, 2, 0], [-7, 1, 3, -4]]; bytes (q[2j] << 4) | (q[2j+1] & 0xF)
    assert qweight.shape == (2, 2)
    assert qweight.view(torch.uint8).tolist() == [[0x7C, 0x20], [0x91, 0x3C]]


def test_quantize_weight_keeps_the_weight_dtype_for_the_scale():
    weight = torch.randn(8, 16).to(torch.float16)
    _, scale = Q.quantize_weight(weight, 4)
    assert scale.dtype == torch.float16


def test_quantize_weight_all_zero_row_gives_zero_scale_and_no_nan():
    weight = torch.randn(3, 8)
    weight[1] = 0
    for bits in (4, 8):
        qweight, scale = Q.quantize_weight(weight, bits)
        assert scale[1] == 0
        restored = Q.dequantize_weight(qweight, scale, bits)
        assert not restored.isnan().any()
        assert torch.equal(restored[1], torch.zeros(8))


def test_quantize_weight_never_wraps_when_the_bfloat16_scale_rounds_down():
    # bf16(1.328125 / 127) is small enough that 1.328125 / scale rounds to 127.5 in bfloat16.
    weight = torch.tensor([[1.328125, 0.5]], dtype=torch.bfloat16)
    qweight, _ = Q.quantize_weight(weight, 8)
    assert qweight[0, 0] == 127


def test_quantize_error_within_half_a_step_and_int8_finer_than_int4():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    errors = {}
    for bits in (4, 8):
        qweight, scale = Q.quantize_weight(weight, bits)
        error = (Q.dequantize_weight(qweight, scale, bits) - weight).abs()
        assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all()
        errors[bits] = error.mean().item()
    assert errors[8] < errors[4] / 8


def test_quantize_weight_rejects_bad_bits_odd_int4_width_and_non_float_weights():
    for bits in (0, 2, 3, 16, True):
        with pytest.raises(ValueError, match="bits"):
            Q.quantize_weight(torch.randn(4, 4), bits)
    with pytest.raises(ValueError, match=r"even.*\(4, 5\)"):
        Q.quantize_weight(torch.randn(4, 5), 4)
    with pytest.raises(ValueError, match="2-D floating"):
        Q.quantize_weight(torch.ones(4, 4, dtype=torch.int8), 8)
    with pytest.raises(ValueError, match="2-D floating"):
        Q.quantize_weight(torch.randn(4), 8)


# ---------------------------------------------------------------------------------------------
# QuantizedLinear: compute paths
# ---------------------------------------------------------------------------------------------


def forbid_fallback(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the dequantizing fallback ran where a CPU kernel should have")

    monkeypatch.setattr(Q, "_fallback_linear", fail)


CPU_KERNELS = {4: "_weight_int4pack_mm_for_cpu", 8: "_weight_int8pack_mm"}


def count_kernel_calls(monkeypatch, bits):
    """Count the calls of the weight-only CPU kernel for `bits` (the calls still go through)."""
    kernel = getattr(torch.ops.aten, CPU_KERNELS[bits])
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setattr(torch.ops.aten, CPU_KERNELS[bits], counted)
    return calls


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("many_rows", [False, True], ids=["kernel-rows", "gemm-rows"])
@pytest.mark.parametrize("bfloat16_gemm", [True, False], ids=["bf16-gemm-cpu", "avx2-cpu"])
def test_cpu_kernel_output_matches_dequantized_reference(monkeypatch, bits, dtype, many_rows, bfloat16_gemm):
    """Few rows (decode) go through the weight-only kernel, many (prefill) through a bfloat16 GEMM
    where oneDNN has one; a CPU without (AVX2) keeps prompts on the kernel, which there is up to 100x
    faster than torch's scalar bfloat16 matmul."""
    monkeypatch.setattr(Q, "_cpu_has_bfloat16_gemm", lambda: bfloat16_gemm)
    rows = Q.CPU_GEMM_MIN_ROWS[bits] + 5 if many_rows else 6
    layer = make_layer(*KERNEL_SHAPE, bits, dtype)
    x = torch.randn(1, rows, KERNEL_SHAPE[1]).to(dtype)
    forbid_fallback(monkeypatch)
    kernel_calls = count_kernel_calls(monkeypatch, bits)
    expected = reference_output(layer, x)  # before the forward converts the weight to a kernel layout
    out = layer(x)
    assert out.shape == (1, rows, KERNEL_SHAPE[0]) and out.dtype == dtype
    # The CPU paths run in bfloat16 (see _cpu_int8_linear): one bfloat16 rounding of x, two of out.
    assert_close_relative(out, expected, 1e-2)
    assert len(kernel_calls) == (0 if many_rows and bfloat16_gemm else 1)
    assert type(layer.backend) is {4: Q.TorchInt4, 8: Q.TorchInt8}[bits]
    if bits == 4:
        assert layer.weight.dtype == torch.uint8  # converted to torch's CPU int4 layout


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 6, 300])
def test_float32_layer_computes_in_float32_like_the_published_cpu_kernels(monkeypatch, bits, rows):
    """A float32 model's layers dequantize to float32 and multiply in float32 (the published CPU
    kernels' numerics), to 1e-5: no bfloat16 round trip (1-3% error) on any path, decode or prompt."""
    layer = make_layer(*KERNEL_SHAPE, bits, torch.float32)
    x = torch.randn(rows, KERNEL_SHAPE[1])
    expected = reference_output(layer, x)  # from the released bytes, before any layout conversion
    layer(torch.randn(1, KERNEL_SHAPE[1]).bfloat16().float())  # CPU int4 layers take their kernel layout first
    kernel_calls = count_kernel_calls(monkeypatch, bits)
    out = layer(x)
    assert out.dtype == torch.float32
    assert_close_relative(out, expected, 1e-5)
    assert kernel_calls == []  # the bfloat16 weight-only kernels never see float32 activations


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fallback_output_matches_dequantized_reference_on_odd_shapes(bits, dtype):
    layer = make_layer(*ODD_SHAPE, bits, dtype)
    x = torch.randn(5, ODD_SHAPE[1]).to(dtype)
    out = layer(x)
    assert out.shape == (5, ODD_SHAPE[0]) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close_relative(out, reference_output(layer, x), tolerance)
    assert type(layer.backend) is Q.Dequantize and layer.weight.dtype == torch.int8  # no kernel takes these shapes


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_backend_stays_within_the_rounding_error_of_the_float_layer(bits):
    """Checked against the float layer itself, not the package's own dequantization."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(ODD_SHAPE[1], ODD_SHAPE[0])
    with torch.no_grad():
        linear.weight.copy_(torch.randn(ODD_SHAPE, generator=generator))
    expected = linear(x := torch.randn(4, ODD_SHAPE[1], generator=generator)).detach()
    layer = Q.QuantizedLinear.from_linear(linear, bits)
    with torch.no_grad():
        out = layer(x)
    assert type(layer.backend) is Q.Dequantize
    # Rounding moves each weight by at most half its row's scale, so each output by at most sum|x| * scale / 2.
    bound = x.abs().sum(-1, keepdim=True) * layer.weight_scale.float()[None, :] / 2
    error = (out - expected).abs()
    assert (error <= bound + 1e-4).all()
    assert error.max() > 1e-3  # the weights were rounded: this is not the float layer


@pytest.mark.parametrize("bits", [4, 8])
def test_forward_accepts_1d_and_empty_inputs(bits):
    layer = make_layer(*KERNEL_SHAPE, bits)
    vector = torch.randn(KERNEL_SHAPE[1])
    expected = reference_output(layer, vector)
    assert layer(vector).shape == (KERNEL_SHAPE[0],)
    assert_close_relative(layer(vector), expected, 1e-2)
    assert layer(torch.randn(0, KERNEL_SHAPE[1])).shape == (0, KERNEL_SHAPE[0])


def test_forward_rejects_input_of_wrong_width():
    layer = make_layer(*KERNEL_SHAPE, 8)
    with pytest.raises(ValueError, match="width 64"):
        layer(torch.randn(2, 65))


def test_layer_without_bias_has_no_bias_parameter_or_key():
    layer = make_layer(*KERNEL_SHAPE, 4, bias=False)
    assert layer.bias is None
    assert set(layer.state_dict()) == {"weight", "weight_scale"}
    x = torch.randn(2, KERNEL_SHAPE[1])
    expected = reference_output(layer, x)
    assert_close_relative(layer(x), expected, 1e-2)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpu_int4_layout_is_recognised_and_inverted_on_other_cpu_capabilities(capability):
    # torch lays CPU int4 weights out by vector width; check the narrower builds too.
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from quantization_helpers import Q, dequantized_weight
        assert Q.detect_cpu_int4_layout() is not None, torch.backends.cpu.get_cpu_capability()
        for out_features in (16, 48, 176, 272):
            weight = torch.randn(out_features, 64, dtype=torch.bfloat16)
            layer = Q.QuantizedLinear(64, out_features, 4, bias=False, dtype=torch.bfloat16)
            layer.weight.data, layer.weight_scale.data = Q.quantize_weight(weight, 4)
            released = layer.weight.detach().clone()
            x = torch.randn(3, 64, dtype=torch.bfloat16)
            expected = x.float() @ dequantized_weight(released, layer.weight_scale.float(), 4).t()
            out = layer(x).float()
            assert type(layer.backend) is Q.TorchInt4 and layer.weight.dtype == torch.uint8
            assert torch.equal(layer.state_dict()["weight"], released)
            assert (out - expected).abs().max() <= 1e-2 * expected.abs().max(), out_features
        """
    )
    environment = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("out_features", [16, 48, 64, 176, 272])
def test_cpu_int4_layout_is_torchs_packing_and_converts_back_to_the_same_released_bytes(out_features):
    # Whole 64/32-row blocks plus every remainder torch packs separately.
    layer = make_layer(out_features, 96, 4, bias=False)
    released = layer.weight.detach().clone()
    layer(torch.randn(1, 96))
    unsigned = (Q.unpack_int4(released) + 8).to(torch.int32)
    packed_by_torch = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 2)
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, packed_by_torch.reshape(-1))
    assert torch.equal(layer.released_weight(), released)


@pytest.mark.parametrize("out_features", [48, 176, 272])
def test_cpu_int4_packing_block_by_block_matches_packing_the_whole_matrix(monkeypatch, out_features):
    # Steps of one 64-row block: several steps, then the rows torch packs as a block of their own.
    monkeypatch.setattr(Q.CpuInt4Layout, "PACK_ROWS", 64)
    layout = Q.detect_cpu_int4_layout()
    released = make_layer(out_features, 96, 4, bias=False).weight.detach().clone()
    unsigned = Q.CpuInt4Layout.released_to_unsigned(released).to(torch.int32)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 2).reshape(-1)
    into_new = torch.empty(released.numel(), dtype=torch.uint8)
    layout.pack_into(released, into_new)
    in_place = released.clone()
    layout.pack_into(in_place, in_place.view(torch.uint8).view(-1))
    assert torch.equal(into_new, expected)
    assert torch.equal(in_place.view(torch.uint8).view(-1), expected)


LAYOUTS = [Q.CpuInt4Layout(*layout) for layout in ((64, True), (32, True), (64, False), (32, False), (16, False))]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("out_features", [16, 48, 80, 176])
def test_cpu_int4_layout_unit_round_trips_and_unpacks_every_layout(layout, out_features):
    """The layout unit on its own, for every layout a torch build may use: released -> layout in
    place -> released gives the same bytes, and unpacking gives the released values (signed) or
    those + 8 (unsigned) in any dtype."""
    generator = torch.Generator().manual_seed(out_features)
    q = torch.randint(-8, 8, (out_features, 64), dtype=torch.int8, generator=generator)
    released = Q.pack_int4(q)
    converted = released.clone()
    layout.pack_into(converted, converted.view(torch.uint8).view(-1))
    packed = converted.view(torch.uint8).view(-1)
    assert not torch.equal(converted, released)  # the bytes did move
    assert torch.equal(layout.to_released(packed, out_features, 64), released)
    assert torch.equal(layout.unpack(packed, out_features, 64), (q + 8).to(torch.uint8))
    for dtype in (torch.int8, torch.float32, torch.bfloat16):
        assert torch.equal(layout.unpack(packed, out_features, 64, dtype, signed=True), q.to(dtype))
    assert torch.equal(Q.CpuInt4Layout.unsigned_to_released(Q.CpuInt4Layout.released_to_unsigned(released)), released)


def test_cpu_int4_layout_fits_only_the_shapes_the_kernel_takes():
    assert Q.CpuInt4Layout.fits(16, 32) and Q.CpuInt4Layout.fits(4096, 13696)
    assert not Q.CpuInt4Layout.fits(40, 64) and not Q.CpuInt4Layout.fits(48, 66) and not Q.CpuInt4Layout.fits(48, 48)


def test_only_a_tensor_nothing_else_shares_counts_as_sole_holder_of_its_memory():
    alone = torch.zeros(8, dtype=torch.int8)
    assert Q._only_holder_of_storage(alone)
    viewed = torch.zeros(8, dtype=torch.int8)
    view = viewed[2:]
    assert not Q._only_holder_of_storage(viewed) and not Q._only_holder_of_storage(view)
    held = torch.zeros(8, dtype=torch.int8)
    storage = held.untyped_storage()  # reads and writes the same bytes
    assert not Q._only_holder_of_storage(held)
    del storage
    assert Q._only_holder_of_storage(held)
    shared = torch.zeros(8, dtype=torch.int8).share_memory_()  # another process may map it
    assert not Q._only_holder_of_storage(shared)
    with torch.inference_mode():
        inference = torch.zeros(8, dtype=torch.int8)
    assert not Q._only_holder_of_storage(inference)
    assert not Q._only_holder_of_storage(torch.zeros(4, 4, dtype=torch.int8).t())
    assert not Q._only_holder_of_storage(torch.zeros(8, dtype=torch.int8, device="meta"))


def test_cpu_int4_conversion_rewrites_a_weight_nothing_else_holds_in_its_own_memory():
    layer = make_layer(*KERNEL_SHAPE, 4)
    address = layer.weight.data_ptr()
    x = torch.randn(3, KERNEL_SHAPE[1])
    expected = reference_output(layer, x)
    out = layer(x)
    assert layer.weight.dtype == torch.uint8 and layer.weight.data_ptr() == address
    assert_close_relative(out, expected, 1e-2)


def test_cpu_int4_conversion_leaves_a_state_dict_taken_before_it_as_it_was():
    # A user's tensor must never be rewritten behind their back: the layer converts a copy.
    layer = make_layer(*KERNEL_SHAPE, 4)
    held = layer.state_dict()["weight"]
    snapshot = held.clone()
    layer(torch.randn(1, KERNEL_SHAPE[1]))
    assert layer.weight.dtype == torch.uint8 and layer.weight.data_ptr() != held.data_ptr()
    assert torch.equal(held, snapshot)
    assert torch.equal(layer.state_dict()["weight"], snapshot)


# ---------------------------------------------------------------------------------------------
# QuantizedLinear: state dict, devices, loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_state_dict_has_release_keys_and_layout_before_and_after_cpu_kernels_ran(bits):
    layer = make_layer(*KERNEL_SHAPE, bits, torch.float16)
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    assert set(before) == {"weight", "weight_scale", "bias"}
    assert before["weight"].dtype == torch.int8
    assert before["weight"].shape == (KERNEL_SHAPE[0], KERNEL_SHAPE[1] * bits // 8)
    assert before["weight_scale"].dtype == torch.float16 and before["weight_scale"].shape == (KERNEL_SHAPE[0],)
    layer(torch.randn(1, KERNEL_SHAPE[1], dtype=torch.float16))
    after = layer.state_dict()
    assert all(torch.equal(after[key], before[key]) and after[key].dtype == before[key].dtype for key in before)


@pytest.mark.parametrize("bits", [4, 8])
def test_state_dict_round_trips_bit_exact_through_torch_save_and_safetensors(bits):
    from safetensors.torch import load as safetensors_load
    from safetensors.torch import save as safetensors_save

    layer = make_layer(*KERNEL_SHAPE, bits, torch.bfloat16)
    x = torch.randn(3, KERNEL_SHAPE[1], dtype=torch.bfloat16)
    expected = layer(x)  # also converts a 4-bit layer to the CPU kernel layout first
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded_by = {
        "torch": torch.load(buffer, weights_only=True),
        "safetensors": safetensors_load(safetensors_save(layer.state_dict())),
    }
    for loaded in loaded_by.values():
        fresh = Q.QuantizedLinear(KERNEL_SHAPE[1], KERNEL_SHAPE[0], bits, dtype=torch.bfloat16)
        fresh.load_state_dict(loaded)
        assert all(torch.equal(fresh.state_dict()[key], value) for key, value in layer.state_dict().items())
        assert torch.equal(fresh(x), expected)


def test_loading_into_a_layer_already_in_the_cpu_kernel_layout_replaces_its_weights():
    layer = make_layer(*KERNEL_SHAPE, 4, seed=0)
    other = make_layer(*KERNEL_SHAPE, 4, seed=1)
    x = torch.randn(2, KERNEL_SHAPE[1])
    layer(x)
    assert layer.weight.dtype == torch.uint8
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    assert torch.equal(layer.state_dict()["weight"], other.state_dict()["weight"])


def test_moving_a_converted_layer_off_the_cpu_restores_the_released_layout():
    layer = make_layer(*KERNEL_SHAPE, 4)
    layer(torch.randn(1, KERNEL_SHAPE[1]))
    layer.to("meta")
    parameter = layer.weight
    out = layer(torch.randn(2, KERNEL_SHAPE[1], device="meta"))
    assert out.shape == (2, KERNEL_SHAPE[0])
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (KERNEL_SHAPE[0], KERNEL_SHAPE[1] // 2)
    assert layer.weight is parameter  # converted through .data: holders of the Parameter stay valid


def test_a_kernel_layout_from_another_torch_build_is_converted_back_by_its_recorded_layout(monkeypatch):
    # As after unpickling a converted layer where torch lays int4 out differently (or not at all).
    layer = make_layer(*KERNEL_SHAPE, 4)
    released = layer.weight.detach().clone()
    x = torch.randn(2, KERNEL_SHAPE[1])
    layer(x)
    assert layer.weight.dtype == torch.uint8
    monkeypatch.setattr(Q, "_cpu_int4_layout", lambda: None)
    layer = copy.deepcopy(layer)  # as unpickled where torch has no int4 kernel layout (the same state)
    out = layer(x)
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, released)
    assert_close_relative(out, reference_output(layer, x), 1e-5)


def test_writing_a_released_tensor_into_a_converted_layer_fails_loudly():
    accelerate_utils = pytest.importorskip("accelerate.utils")
    layer = make_layer(*KERNEL_SHAPE, 4)
    released = layer.weight.detach().clone()
    layer(torch.randn(1, KERNEL_SHAPE[1]))
    with pytest.raises(ValueError, match="shape"):
        accelerate_utils.set_module_tensor_to_device(layer, "weight", "cpu", value=released)


def test_layer_builds_on_meta_and_loads_a_checkpoint_by_assignment():
    source = make_layer(*KERNEL_SHAPE, 4, torch.float16)
    with torch.device("meta"):
        layer = Q.QuantizedLinear(KERNEL_SHAPE[1], KERNEL_SHAPE[0], 4, dtype=torch.float16)
    assert {name: (p.device.type, p.dtype, tuple(p.shape)) for name, p in layer.named_parameters()} == {
        "weight": ("meta", torch.int8, (48, 32)),
        "weight_scale": ("meta", torch.float16, (48,)),
        "bias": ("meta", torch.float16, (48,)),
    }
    layer.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(2, KERNEL_SHAPE[1], dtype=torch.float16)
    assert torch.equal(layer(x), source(x))
    assert not layer.weight.requires_grad and not layer.weight_scale.requires_grad


def test_layer_builds_under_accelerate_init_empty_weights_and_loads_tensor_by_tensor():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import set_module_tensor_to_device

    source = make_layer(*KERNEL_SHAPE, 8, torch.bfloat16)
    with accelerate.init_empty_weights():
        layer = Q.QuantizedLinear(KERNEL_SHAPE[1], KERNEL_SHAPE[0], 8, dtype=torch.bfloat16)
    assert all(p.device.type == "meta" for p in layer.parameters())
    for name, tensor in source.state_dict().items():
        set_module_tensor_to_device(layer, name, "cpu", value=tensor)
    x = torch.randn(2, KERNEL_SHAPE[1], dtype=torch.bfloat16)
    assert torch.equal(layer(x), source(x))


def test_to_empty_then_load_state_dict_gives_the_checkpoint_layer():
    source = make_layer(*ODD_SHAPE, 4)
    with torch.device("meta"):
        layer = Q.QuantizedLinear(ODD_SHAPE[1], ODD_SHAPE[0], 4)
    layer.to_empty(device="cpu").load_state_dict(source.state_dict())
    x = torch.randn(2, ODD_SHAPE[1])
    assert torch.equal(layer(x), source(x))


def test_loading_a_float_weight_into_a_4bit_layer_names_the_tensor_and_both_shapes():
    model = nn.Module()
    model.proj = Q.QuantizedLinear(64, 40, 4)
    state = {"proj.weight": torch.randn(40, 64), "proj.weight_scale": torch.ones(40), "proj.bias": torch.zeros(40)}
    with pytest.raises(ValueError) as error:
        model.load_state_dict(state)
    message = str(error.value)
    assert "proj.weight" in message and "(40, 32)" in message and "(40, 64)" in message
    assert "quantization_bit=0" in message


def test_loading_an_8bit_weight_into_a_4bit_layer_suggests_the_other_bit_width():
    layer = Q.QuantizedLinear(64, 40, 4)
    state = {"weight": torch.zeros(40, 64, dtype=torch.int8), "weight_scale": torch.ones(40), "bias": torch.zeros(40)}
    with pytest.raises(ValueError, match=r"\(40, 32\).*\(40, 64\).*quantization_bit=8"):
        layer.load_state_dict(state)


def test_loading_a_scale_of_the_wrong_shape_names_it():
    layer = Q.QuantizedLinear(64, 40, 8)
    state = {"weight": torch.zeros(40, 64, dtype=torch.int8), "weight_scale": torch.ones(40, 1), "bias": torch.zeros(40)}
    with pytest.raises(ValueError, match=r"weight_scale.*\(40,\).*\(40, 1\)"):
        layer.load_state_dict(state)


def test_a_mismatched_tensor_assigned_directly_fails_where_it_is_assigned():
    layer = Q.QuantizedLinear(64, 40, 4)
    with pytest.raises(ValueError, match=r"weight.*\(40, 32\).*\(40, 64\)"):
        layer.weight = nn.Parameter(torch.randn(40, 64), requires_grad=False)  # as transformers 5's loader does
    with pytest.raises(ValueError, match=r"weight_scale.*\(40,\).*\(40, 1\)"):
        layer.weight_scale = nn.Parameter(torch.ones(40, 1), requires_grad=False)
    assert layer.weight.shape == (40, 32) and layer.weight_scale.shape == (40,)  # left as they were


@pytest.mark.parametrize("bits", [4, 8])
def test_forward_checks_no_stored_tensor(monkeypatch, bits):
    """Stored tensors are checked once where they enter the layer, not at each of the 112 calls per 6B token."""
    layer = make_layer(*KERNEL_SHAPE, bits, torch.bfloat16)
    checks = []
    monkeypatch.setattr(Q, "check_stored_weight", lambda *args, **kwargs: checks.append(args))
    monkeypatch.setattr(Q.QuantizedLinear, "check_loaded_tensor", lambda *args, **kwargs: checks.append(args))
    for rows in (1, 1, Q.CPU_GEMM_MIN_ROWS[bits]):
        layer(torch.randn(rows, KERNEL_SHAPE[1], dtype=torch.bfloat16))
    assert checks == []


def test_constructor_rejects_bad_bits_and_odd_int4_width():
    for bits in (0, 3, 16):
        with pytest.raises(ValueError, match="bits must be 4 or 8"):
            Q.QuantizedLinear(64, 40, bits)
    with pytest.raises(ValueError, match="even.*65"):
        Q.QuantizedLinear(65, 40, 4)
    Q.QuantizedLinear(65, 40, 8)  # int8 has no such constraint


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [KERNEL_SHAPE, ODD_SHAPE], ids=["kernel", "fallback"])
def test_input_and_bias_gradients_match_the_dequantized_float_layer(bits, shape):
    layer = make_layer(*shape, bits)
    float_layer = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        float_layer.weight.copy_(dequantized_weight(layer.released_weight(), layer.weight_scale, bits))
        float_layer.bias.copy_(layer.bias)
    x = torch.randn(2, 3, shape[1])
    upstream = torch.randn(2, 3, shape[0])
    x_quantized = x.clone().requires_grad_()
    x_float = x.clone().requires_grad_()
    (layer(x_quantized) * upstream).sum().backward()
    (float_layer(x_float) * upstream).sum().backward()
    torch.testing.assert_close(x_quantized.grad, x_float.grad)
    torch.testing.assert_close(layer.bias.grad, float_layer.bias.grad)
    assert layer.weight.grad is None and layer.weight_scale.grad is None


def test_a_trainable_input_before_a_frozen_quantized_layer_learns_through_it():
    # As P-Tuning / LoRA on earlier layers: the trainable part only gets gradients through the layer.
    torch.manual_seed(0)
    base = make_layer(*KERNEL_SHAPE, 4, bias=False)
    x = torch.randn(32, KERNEL_SHAPE[1])
    target = base(x + torch.randn(KERNEL_SHAPE[1])).detach()
    offset = nn.Parameter(torch.zeros(KERNEL_SHAPE[1]))
    optimizer = torch.optim.Adam([offset], lr=0.1)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(base(x + offset), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_kernel_conversion_under_inference_mode_leaves_a_weight_training_can_use():
    layer = make_layer(*KERNEL_SHAPE, 4)
    with torch.inference_mode():
        layer(torch.randn(1, KERNEL_SHAPE[1]))
    assert not layer.weight.is_inference()
    x = torch.randn(2, KERNEL_SHAPE[1], requires_grad=True)
    layer(x).sum().backward()
    weight = dequantized_weight(layer.released_weight(), layer.weight_scale.float(), 4)
    torch.testing.assert_close(x.grad, torch.ones(2, KERNEL_SHAPE[0]) @ weight, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_layer_quantized_under_inference_mode_runs_there_and_after(bits):
    """Serving code may load and quantize inside inference_mode; the CPU kernels must still run."""
    linear = nn.Linear(KERNEL_SHAPE[1], KERNEL_SHAPE[0])
    x = torch.randn(3, KERNEL_SHAPE[1])
    with torch.inference_mode():
        layer = Q.QuantizedLinear.from_linear(linear, bits)
        inside = layer(x)
        again = layer(x)
    torch.testing.assert_close(again, inside)
    with torch.no_grad():  # inference tensors cannot enter autograd; plain no_grad use works
        torch.testing.assert_close(layer(x), inside)
    assert_close_relative(inside, reference_output(layer, x), 1e-2)


# ---------------------------------------------------------------------------------------------
# quantize_model
# ---------------------------------------------------------------------------------------------


def stand_in_transformer(hidden=64, ffn=48, qkv=96, num_layers=2, device=None):
    """The module tree quantize_model walks: encoder.layers[i].{self_attention,mlp}.*, plus extras."""

    def layer():
        block = nn.Module()
        block.input_layernorm = nn.LayerNorm(hidden)
        block.self_attention = nn.Module()
        block.self_attention.query_key_value = nn.Linear(hidden, qkv, bias=True)
        block.self_attention.dense = nn.Linear(hidden, hidden, bias=False)
        block.mlp = nn.Module()
        block.mlp.dense_h_to_4h = nn.Linear(hidden, 2 * ffn, bias=False)
        block.mlp.dense_4h_to_h = nn.Linear(ffn, hidden, bias=False)
        return block

    with torch.device(device or "cpu"):
        torch.manual_seed(0)
        transformer = nn.Module()
        transformer.encoder = nn.Module()
        transformer.encoder.layers = nn.ModuleList(layer() for _ in range(num_layers))
        transformer.output_layer = nn.Linear(hidden, 100, bias=False)
    return transformer


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_model_replaces_exactly_the_four_projections_of_every_layer(bits):
    transformer = stand_in_transformer()
    floats = {name: module for name, module in transformer.named_modules() if isinstance(module, nn.Linear)}
    kept = {name: module for name, module in transformer.named_modules() if not name.endswith(Q.QUANTIZED_PROJECTIONS)}
    assert Q.quantize_model(transformer, bits) is transformer
    modules = dict(transformer.named_modules())
    for index in range(2):
        for path in Q.QUANTIZED_PROJECTIONS:
            name = f"encoder.layers.{index}.{path}"
            quantized, linear = modules[name], floats[name]
            assert isinstance(quantized, Q.QuantizedLinear) and quantized.bits == bits
            expected_weight, expected_scale = Q.quantize_weight(linear.weight.detach(), bits)
            assert torch.equal(quantized.weight, expected_weight)
            assert torch.equal(quantized.weight_scale, expected_scale)
            assert quantized.bias is linear.bias
    for name, module in kept.items():
        assert modules[name] is module
    assert type(modules["output_layer"]) is nn.Linear


def test_quantize_model_moves_each_layer_to_the_device_and_quantizes_there():
    transformer = stand_in_transformer()
    Q.quantize_model(transformer, 4, device="meta")
    for name, parameter in transformer.encoder.named_parameters():
        assert parameter.device.type == "meta", name
    qkv = transformer.encoder.layers[0].self_attention.query_key_value
    assert qkv.weight.dtype == torch.int8 and qkv.weight.shape == (96, 32)
    assert transformer.output_layer.weight.device.type == "cpu"  # outside the layers: left alone


def test_quantize_model_empty_init_allocates_released_shapes_without_computing():
    transformer = stand_in_transformer(device="meta")
    Q.quantize_model(transformer, 4, empty_init=True)
    dense_4h_to_h = transformer.encoder.layers[1].mlp.dense_4h_to_h
    assert dense_4h_to_h.weight.device.type == "meta" and dense_4h_to_h.weight.shape == (64, 24)
    assert transformer.encoder.layers[0].self_attention.query_key_value.bias is not None

    on_cpu = Q.quantize_model(stand_in_transformer(), 8, empty_init=True)
    for path in Q.QUANTIZED_PROJECTIONS:
        module = on_cpu.encoder.layers[0].get_submodule(path)
        assert module.weight.device.type == "cpu" and module.weight.dtype == torch.int8
        assert not module.weight_scale.any()  # left at zero: nothing was quantized


def test_quantize_model_rejects_bad_bits_and_leaves_the_model_alone():
    transformer = stand_in_transformer()
    for bits in (0, 2, 16, "4"):
        with pytest.raises(ValueError, match="bits must be 4 or 8"):
            Q.quantize_model(transformer, bits)
    assert not any(isinstance(module, Q.QuantizedLinear) for module in transformer.modules())


def test_quantize_model_int4_with_odd_width_names_the_layer_and_shape_and_changes_nothing():
    transformer = stand_in_transformer(ffn=33)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.mlp\.dense_4h_to_h.*\(64, 33\)"):
        Q.quantize_model(transformer, 4)
    assert not any(isinstance(module, Q.QuantizedLinear) for module in transformer.modules())
    Q.quantize_model(transformer, 8)  # int8 takes any width


def test_quantize_model_again_with_the_same_bits_is_a_no_op_and_other_bits_are_refused():
    transformer = Q.quantize_model(stand_in_transformer(), 4)
    qkv = transformer.encoder.layers[0].self_attention.query_key_value
    Q.quantize_model(transformer, 4)
    assert transformer.encoder.layers[0].self_attention.query_key_value is qkv
    with pytest.raises(ValueError, match="already quantized to 4 bits"):
        Q.quantize_model(transformer, 8)


def test_quantized_stand_in_layer_stays_close_to_the_float_layer():
    transformer = stand_in_transformer()
    float_dense = transformer.encoder.layers[0].mlp.dense_h_to_4h
    x = torch.randn(4, 64)
    expected = float_dense(x).detach()
    errors = {}
    for bits in (8, 4):
        quantized = Q.quantize_model(stand_in_transformer(), bits).encoder.layers[0].mlp.dense_h_to_4h
        errors[bits] = (quantized(x) - expected).abs().max().item() / expected.abs().max().item()
    assert errors[8] < 0.02 and errors[4] < 0.25 and errors[8] < errors[4]


# ---------------------------------------------------------------------------------------------
# Optional Triton
# ---------------------------------------------------------------------------------------------


def test_module_imports_and_runs_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    without_triton = load_quantization("chatglm_quantization_without_triton")
    assert without_triton._HAS_TRITON is False
    for bits in (4, 8):
        layer = without_triton.QuantizedLinear.from_linear(nn.Linear(64, 48), bits)
        x = torch.randn(2, 64)
        assert not without_triton.Triton.fits(layer)
        assert layer(x).shape == (2, 48)


def test_triton_failure_on_first_launch_falls_back_and_later_failures_raise(monkeypatch):
    layer = make_layer(*KERNEL_SHAPE, 8)
    x = torch.randn(2, KERNEL_SHAPE[1])
    args = (x, layer.weight, layer.weight_scale, layer.bias, 8)
    expected = exact_output(layer, x)
    monkeypatch.setattr(Q, "_triton_status", {})

    def no_compiler(*args):
        raise RuntimeError("no ptxas for this GPU")

    attempts = []

    def counting_no_compiler(*args):
        attempts.append(1)
        no_compiler(*args)

    monkeypatch.setattr(Q, "_triton_linear", counting_no_compiler)
    assert torch.equal(Q._cuda_linear(*args), expected)  # first launch fails: fallback, remembered
    assert torch.equal(Q._cuda_linear(*args), expected)
    assert len(attempts) == 1, "the failed kernel must not be tried again"

    monkeypatch.setattr(Q, "_triton_status", {})
    monkeypatch.setattr(Q, "_triton_linear", lambda *args: expected)
    Q._cuda_linear(*args)  # it ran once here...
    monkeypatch.setattr(Q, "_triton_linear", no_compiler)
    with pytest.raises(RuntimeError, match="ptxas"):  # ...so a later error is real and surfaces
        Q._cuda_linear(*args)


# ---------------------------------------------------------------------------------------------
# Optional onnxruntime CPU kernel
# ---------------------------------------------------------------------------------------------

needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnxruntime and onnx are optional",
)


@needs_onnxruntime
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 200])
def test_onnxruntime_kernel_stays_within_int8_activation_error_and_keeps_the_released_bytes(bits, dtype, rows):
    # 200 inputs: not a whole number of 128-input blocks, so the last block is padded.
    layer = make_layer(48, 200, bits, dtype)
    released = layer.weight.detach().clone()
    Q.set_cpu_kernel(layer, "onnxruntime")
    x = torch.randn(rows, 200).to(dtype)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 48)
    # int8 activations per 128-input block: about 0.5% here, as ggml's q8_0; bfloat16 output rounding on top.
    assert_close_relative(out, reference_output(layer, x), 2e-2)
    assert layer.backend.matmul._kept is None  # onnxruntime packed its own copy; the converted buffer is gone
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.state_dict()["weight"], released)


@needs_onnxruntime
def test_onnxruntime_layer_never_takes_the_torch_int4_layout(monkeypatch):
    """Converting first would rewrite, so copy, every page of a checkpoint loaded as stored (2.7 GB of
    the 6B model's memory) and cost 10 s, only for onnxruntime to pack the released bytes again."""
    layer = make_layer(*KERNEL_SHAPE, 4)
    Q.set_cpu_kernel(layer, "onnxruntime")
    monkeypatch.setattr(Q.CpuInt4Layout, "pack_into", lambda *args: pytest.fail("converted to the torch int4 layout"))
    with torch.no_grad():
        layer(torch.randn(2, KERNEL_SHAPE[1]))
    assert layer.weight.dtype == torch.int8 and type(layer.backend) is Q.OnnxRuntime


@needs_onnxruntime
def test_onnxruntime_kernel_rebuilds_after_new_weights_are_loaded():
    layer = make_layer(*KERNEL_SHAPE, 4, seed=0)
    other = make_layer(*KERNEL_SHAPE, 4, seed=1)
    Q.set_cpu_kernel(layer, "onnxruntime")
    x = torch.randn(2, KERNEL_SHAPE[1])
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert_close_relative(layer(x), reference_output(other, x), 2e-2)
        session = weakref.ref(layer.backend)
        layer.weight = nn.Parameter(make_layer(*KERNEL_SHAPE, 4, seed=2).weight.detach(), requires_grad=False)
        assert session() is None  # let go where the weight was replaced, not at the next call


@needs_onnxruntime
def test_onnxruntime_kernel_is_not_used_for_training():
    layer, same = make_layer(*KERNEL_SHAPE, 4), make_layer(*KERNEL_SHAPE, 4)
    Q.set_cpu_kernel(layer, "onnxruntime")
    x = torch.randn(2, KERNEL_SHAPE[1], requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.equal(out, exact_output(same, x.detach()))
    assert torch.equal(x.grad, torch.ones(2, KERNEL_SHAPE[0]) @ dequantized_weight(same.weight, same.weight_scale, 4))


@needs_onnxruntime
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [64, 200])  # one MatMulNBits block of inputs; two
def test_onnxruntime_kernel_leaves_the_layers_tensors_as_they_were(dtype, in_features):
    layer = make_layer(48, in_features, 4, dtype)
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    Q.set_cpu_kernel(layer, "onnxruntime")
    with torch.no_grad():
        layer(torch.randn(2, in_features).to(dtype))
    assert all(torch.equal(layer.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize(
    "kernel, package, hint",
    [("onnxruntime", "onnxruntime", "onnxruntime and onnx packages"), ("chatglm_cpu", "chatglm_cpu", "pip install ./cpu_kernels")],
)
def test_an_optional_kernel_without_its_package_warns_and_keeps_the_torch_kernels(monkeypatch, caplog, kernel, package, hint):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` raise ImportError
    without = load_quantization(f"chatglm_quantization_without_{package}")
    layer = without.QuantizedLinear.from_linear(nn.Linear(64, 48), 4)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer.bfloat16()(x)
        with caplog.at_level("WARNING"):
            without.set_cpu_kernel(layer, kernel)
        assert hint in caplog.text and "torch CPU kernels instead" in caplog.text
        assert torch.equal(layer(x), expected)
    assert type(layer.backend) is without.TorchInt4


def test_the_default_kernel_without_chatglm_cpu_is_torch_without_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "chatglm_cpu", None)
    without = load_quantization("chatglm_quantization_default_without_chatglm_cpu")
    layer = without.QuantizedLinear.from_linear(nn.Linear(64, 48), 4)
    with caplog.at_level("WARNING"):
        without.set_cpu_kernel(layer, None)
        without.set_cpu_kernel(layer, "auto")
    assert layer.cpu_kernel == "torch" and caplog.text == ""


# ---------------------------------------------------------------------------------------------
# Optional chatglm_cpu CPU kernel (cpu_kernels/; the kernel itself: tests/test_cpu_kernels.py)
# ---------------------------------------------------------------------------------------------


needs_chatglm_cpu = pytest.mark.skipif(not chatglm_cpu_runs(), reason="chatglm_cpu is optional and needs AVX2")


@needs_chatglm_cpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7])
def test_chatglm_cpu_kernel_reads_the_released_bytes_in_place_within_int8_activation_error(bits, dtype, rows, monkeypatch):
    layer = make_layer(*KERNEL_SHAPE, bits, dtype)
    stored = layer.weight.data_ptr()
    released = layer.weight.detach().clone()
    Q.set_cpu_kernel(layer, "chatglm_cpu")
    monkeypatch.setattr(Q.CpuInt4Layout, "pack_into", lambda *args: pytest.fail("converted to the torch int4 layout"))
    x = torch.randn(2, rows, KERNEL_SHAPE[1]).to(dtype)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == dtype and out.shape == (2, rows, KERNEL_SHAPE[0])
    # int8 activations per group of 64 inputs here (about 0.5%), then the output dtype's rounding.
    assert_close_relative(out, reference_output(layer, x), 2e-2)
    assert layer.weight.data_ptr() == stored and torch.equal(layer.state_dict()["weight"], released)


@needs_chatglm_cpu
def test_the_default_kernel_is_chatglm_cpu_where_it_runs():
    layer = make_layer(*KERNEL_SHAPE, 4, torch.bfloat16)
    assert Q.DEFAULT_CPU_KERNEL == "auto"
    Q.set_cpu_kernel(layer, None)
    assert layer.cpu_kernel == "chatglm_cpu"
    Q.set_cpu_kernel(layer, "torch")
    assert layer.cpu_kernel == "torch"
    Q.set_cpu_kernel(layer, "auto")
    assert layer.cpu_kernel == "chatglm_cpu"


@needs_chatglm_cpu
def test_chatglm_cpu_kernel_leaves_float64_to_the_exact_path():
    layer = make_layer(*KERNEL_SHAPE, 4, torch.float64)
    Q.set_cpu_kernel(layer, "chatglm_cpu")
    x = torch.randn(2, KERNEL_SHAPE[1], dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_output(layer, x).double(), rtol=1e-5, atol=1e-5)


@needs_chatglm_cpu
def test_chatglm_cpu_kernel_takes_a_weight_back_from_the_torch_int4_layout():
    # The torch kernels converted the weight; switched to the kernel that reads the released bytes, the
    # layer converts it back.
    layer = make_layer(*KERNEL_SHAPE, 4, torch.bfloat16)
    x = torch.randn(3, KERNEL_SHAPE[1], dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
    assert layer.weight.dtype == torch.uint8
    Q.set_cpu_kernel(layer, "chatglm_cpu")
    with torch.no_grad():
        out = layer(x)
    assert layer.weight.dtype == torch.int8
    assert_close_relative(out, reference_output(layer, x), 2e-2)


@needs_chatglm_cpu
def test_chatglm_cpu_kernel_follows_parameters_changed_after_its_first_call():
    # The layer keeps the kernel's checked handle between calls (checking 112 weights per token cost a
    # 6B decode step milliseconds): a parameter replaced, a `.data` swapped in, a copy in place, a dtype
    # change must each reach the next call, never the old bytes.
    layer = make_layer(*KERNEL_SHAPE, 4, torch.float16)
    Q.set_cpu_kernel(layer, "chatglm_cpu")
    x = torch.randn(2, KERNEL_SHAPE[1], generator=torch.Generator().manual_seed(0)).half()  # int8 rounding: seeded
    other = make_layer(*KERNEL_SHAPE, 4, torch.float16, seed=1)
    changes = [
        lambda: setattr(layer, "weight_scale", nn.Parameter(layer.weight_scale * 3, requires_grad=False)),
        lambda: setattr(layer.weight, "data", other.weight.detach().clone()),
        lambda: layer.weight.copy_(make_layer(*KERNEL_SHAPE, 4, torch.float16, seed=2).weight),
        lambda: setattr(layer.bias, "data", layer.bias.detach() + 10),  # past the tolerance in every output
        lambda: layer.to(torch.bfloat16),
    ]
    with torch.no_grad():
        for change in changes:
            layer(x.to(layer.weight_scale.dtype))
            change()
            dtype = layer.weight_scale.dtype
            out = layer(x.to(dtype))
            assert out.dtype == dtype
            assert_close_relative(out, reference_output(layer, x.to(dtype)), 2e-2)


@needs_chatglm_cpu
def test_a_training_forward_after_chatglm_cpu_inference_is_exact_and_leaves_the_weight_where_it_lies():
    # Gradients take the exact path, which reads the released bytes the kernel reads too: no conversion.
    layer = make_layer(*KERNEL_SHAPE, 4, torch.bfloat16)
    Q.set_cpu_kernel(layer, "chatglm_cpu")
    x = torch.randn(3, KERNEL_SHAPE[1], dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
    stored = layer.weight.data_ptr()
    trained = x.clone().requires_grad_()
    out = layer(trained)
    out.float().sum().backward()
    assert layer.weight.dtype == torch.int8 and layer.weight.data_ptr() == stored
    assert torch.equal(out, exact_output(layer, x))
    dequantized = dequantized_weight(layer.weight, layer.weight_scale, 4)
    assert torch.equal(trained.grad, torch.ones(3, KERNEL_SHAPE[0], dtype=torch.bfloat16) @ dequantized)


@needs_chatglm_cpu
@pytest.mark.parametrize("bits", [4, 8])
def test_torch_compile_keeps_the_chatglm_cpu_kernel_as_an_operator_of_one_graph(bits):
    # A direct call on raw addresses ended the graph (fullgraph=True refused it); the operator is traced.
    layer = make_layer(*KERNEL_SHAPE, bits, torch.bfloat16)
    Q.set_cpu_kernel(layer, "chatglm_cpu")
    x = torch.randn(3, KERNEL_SHAPE[1], dtype=torch.bfloat16)
    traced_ops = []

    def recording_backend(graph_module, example_inputs):
        traced_ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend=recording_backend)(x)
    assert type(layer.backend) is Q.ChatGLMCpu
    assert traced_ops == ["chatglm_cpu.linear"]
    assert torch.equal(compiled, eager)


@needs_chatglm_cpu
def test_chatglm_cpu_calls_are_named_in_torch_profiler_traces():
    # bench.profile_decode reads the kernel's share of a step from this name; outside a profiler
    # the name is not entered (it cost ~8 us per call, ~1 ms per 6B decode step).
    layer = make_layer(*KERNEL_SHAPE, 4, torch.bfloat16)
    Q.set_cpu_kernel(layer, "chatglm_cpu")
    x = torch.randn(1, KERNEL_SHAPE[1], dtype=torch.bfloat16)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        layer(x)
    assert [event.count for event in profile.key_averages() if event.key == "chatglm_cpu::linear"] == [1]


def test_set_cpu_kernel_names_the_choices_for_an_unknown_kernel():
    with pytest.raises(ValueError, match="'auto', 'torch', 'onnxruntime', 'chatglm_cpu'.*'cuda'"):
        Q.set_cpu_kernel(make_layer(*KERNEL_SHAPE, 4), "cuda")


def test_paging_out_a_weight_never_changes_its_bytes(tmp_path):
    # Clean pages of a mapped checkpoint may be dropped and read again; written and anonymous pages stay.
    anonymous = torch.randint(-128, 128, (300, 4096), dtype=torch.int8)
    torch.save({"w": anonymous}, tmp_path / "w.bin")
    mapped = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)["w"]
    written = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)["w"]
    written[7] = 1  # a private copy-on-write page now
    expected_written = written.clone()
    for tensor, expected in ((anonymous, anonymous.clone()), (mapped, anonymous.clone()), (written, expected_written)):
        assert torch.equal(tensor, expected)  # resident now
        Q._page_out(tensor)
        assert torch.equal(tensor, expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory-mapped files are read through /proc/self/maps")
def test_a_layout_conversion_stops_the_prefault_thread_and_still_converts_in_place(tmp_path, monkeypatch):
    # The mapping thread holds the weights it maps: counted as other holders, they made the conversion copy
    # the weight (a second copy of the model) whenever the first forward came before the thread was done.
    layer = make_layer(*KERNEL_SHAPE, 4, torch.bfloat16)
    torch.save(layer.state_dict(), tmp_path / "w.bin")
    mapped = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)
    layer.load_state_dict(mapped, assign=True)
    del mapped
    monkeypatch.setattr(Q, "populate", lambda tensors, stop: stop.wait(60))  # a mapping that takes its time
    owner = nn.Module()
    owner.layer = layer
    owner.get_input_embeddings = lambda: None
    thread = Q.prefault_mapped_weights(owner)
    assert thread is not None and thread.is_alive()
    address = layer.weight.data_ptr()
    with torch.no_grad():
        layer(torch.randn(1, KERNEL_SHAPE[1], dtype=torch.bfloat16))
    assert not thread.is_alive()
    assert layer.weight.dtype == torch.uint8 and layer.weight.data_ptr() == address


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_READ and per-thread fault counts are Linux's")
def test_populate_maps_every_page_of_a_memory_mapped_weight_so_reading_it_takes_no_page_fault(tmp_path):
    weight = torch.randint(-128, 128, (1000, 4096), dtype=torch.int8)  # 1000 pages
    torch.save({"w": weight}, tmp_path / "w.bin")
    fresh = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)["w"]
    assert page_faults_reading([fresh]) > 0  # a new mapping: its first reader takes the faults
    populated = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)["w"]
    Q.populate([populated])
    assert page_faults_reading([populated]) == 0
    assert torch.equal(populated, weight)
