"""The optional chatglm_cpu kernels (cpu_kernels/): integer dot products on the released bytes.

Skipped where the package is not installed or the CPU has no AVX2 (CI installs it: requirements-test.txt).
"""

import importlib.metadata
import multiprocessing
import re
import threading

import pytest
import torch

chatglm_cpu = pytest.importorskip("chatglm_cpu")
if not chatglm_cpu.available():
    pytest.skip("this CPU has no AVX2/FMA/F16C", allow_module_level=True)

from quantization_helpers import released_bytes  # noqa: E402  (the released packing, written in the tests)


def random_q(out_features, in_features, bits, seed=0):
    top = 7 if bits == 4 else 127
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-top - (bits == 4), top + 1, (out_features, in_features), dtype=torch.int8, generator=generator)


def group_size(in_features):
    return next(size for size in chatglm_cpu.GROUP_SIZES if in_features % size == 0)


def int8_activation_reference(x, q, scale, bias, group=None):
    """float64 product of the activations quantized as the kernel does (per group of `group` inputs, by default
    the kernel's: 127 / max|x|, round half to even) with the integer weights, times the row scale, plus the bias."""
    rows, in_features = x.shape
    groups = x.float().view(rows, -1, group or group_size(in_features))
    magnitude = groups.abs().amax(-1, keepdim=True)
    # A true division, as the kernel does (`127.0 / tensor` is computed as 127 * (1 / tensor) in torch).
    multiplier = torch.where(magnitude > 0, torch.full_like(magnitude, 127.0) / magnitude, torch.zeros_like(magnitude))
    dequantized = ((groups * multiplier).round() * (magnitude / 127.0)).view(rows, in_features)
    out = dequantized.double() @ q.double().T * scale.double()
    return out + bias.double() if bias is not None else out


# Every instruction set's kernels, each run where the CPU has it: they must agree bit for bit.
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in chatglm_cpu.isas(), reason=f"this CPU has no {isa}"))
        for isa in ("avx2", "avx512_vnni")]


def integer_activations(rows, in_features, seed=1):
    """Integers in [-127, 127] with 127 in every group: they quantize to themselves with scale 1."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (rows, in_features), generator=generator).float()
    x[:, :: group_size(in_features)] = 127
    return x


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
# either side of a VNNI block of rows, and past the rows from which int4 unpacks its weights once per chunk
@pytest.mark.parametrize("rows", [1, chatglm_cpu.VNNI_BATCH_ROWS - 1, chatglm_cpu.VNNI_BATCH_ROWS + 1, chatglm_cpu.UNPACK_ONCE_FROM_ROWS + 1])
@pytest.mark.parametrize("threads", [1, 2, 3])
# a remainder (blocks of 4, a pair of rows, a row alone); whole chunks; at one row, chunks of more than CHUNK_ROWS
# rows, shrinking, and a remainder
@pytest.mark.parametrize("out_features", [15, 2 * chatglm_cpu.CHUNK_ROWS, 9 * chatglm_cpu.CHUNK_ROWS + 13])
@pytest.mark.parametrize("in_features", [256, 96])  # int4 spans of 64 inputs; of 32 where K is not a multiple of 64
def test_integer_activations_give_the_exact_integer_products(isa, bits, rows, threads, out_features, in_features):
    # Every nibble order, the zero point of the int4 bytes, the row split between threads and both
    # the one-row and the several-row paths are exact here: any slip changes an integer.
    q = random_q(out_features, in_features, bits)
    x = integer_activations(rows, in_features)
    out = chatglm_cpu.linear(x, released_bytes(q, bits), torch.ones(out_features), None, bits, threads, isa)
    assert torch.equal(out, (x.long() @ q.long().T).float())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, chatglm_cpu.VNNI_BATCH_ROWS + 1])  # outputs stored one at a time; 4 at a time
def test_outputs_are_rounded_to_a_half_precision_dtype_as_torch_rounds(isa, dtype, rows):
    # Exact integer products (scale 1), many of them halfway between two bfloat16 or float16 values: the kernel's
    # rounding must be torch's round half to even, overflow to infinity included.
    q = random_q(64, 256, 4)
    x = integer_activations(rows, 256)
    out = chatglm_cpu.linear(x.to(dtype), released_bytes(q, 4), torch.ones(64, dtype=dtype), None, 4, isa=isa)
    assert torch.equal(out, (x.long() @ q.long().T).float().to(dtype))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_features", [96, 192, 4096])  # groups of 32, 64 and 128 inputs
@pytest.mark.parametrize("rows", [1, 5])
def test_float_activations_match_the_int8_activation_reference(bits, dtype, in_features, rows):
    generator = torch.Generator().manual_seed(2)
    q = random_q(36, in_features, bits)
    scale = (torch.rand(36, generator=generator) * 0.01 + 0.001).to(dtype)
    bias = torch.randn(36, generator=generator).to(dtype)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    out = chatglm_cpu.linear(x, released_bytes(q, bits), scale, bias, bits)
    assert out.dtype == dtype and out.shape == (rows, 36)
    expected = int8_activation_reference(x, q, scale, bias)
    # float32 sums in another order; float16 / bfloat16 results are rounded once at the end.
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("in_features", [96, 192, 4096, 13696])
def test_activations_are_scaled_per_group_of_the_largest_exported_size_dividing_the_width(isa, in_features):
    # Magnitudes that change every 16 inputs make every grouping round differently: only the reference quantized
    # per group of group_size(in_features) (the largest of chatglm_cpu.GROUP_SIZES dividing it) is the kernel's.
    generator = torch.Generator().manual_seed(6)
    q = random_q(24, in_features, 8)
    magnitudes = torch.tensor([1.0, 0.01, 0.2, 5.0]).repeat(in_features // 64 + 1)[: in_features // 16]
    x = torch.randn(2, in_features, generator=generator) * magnitudes.repeat_interleave(16)
    out = chatglm_cpu.linear(x, q, torch.ones(24), None, 8, isa=isa).double()
    groupings = [size for size in (16, 32, 64, 128, 256, 512) if in_features % size == 0]
    errors = {size: (out - int8_activation_reference(x, q, torch.ones(24), None, size)).abs().max().item() for size in groupings}
    largest = out.abs().max().item()
    assert errors[group_size(in_features)] < 1e-5 * largest
    assert all(error > 1e-3 * largest for size, error in errors.items() if size != group_size(in_features))


def test_widths_the_group_sizes_do_not_divide_are_refused():
    smallest = chatglm_cpu.GROUP_SIZES[-1]
    weight, scale = torch.zeros(4, smallest, dtype=torch.int8), torch.ones(4)
    assert chatglm_cpu.linear(torch.ones(1, smallest), weight, scale, None, 8).shape == (1, 4)
    with pytest.raises(ValueError, match=f"multiple of {smallest}, got {smallest + smallest // 2}"):
        chatglm_cpu.linear(torch.ones(1, smallest + smallest // 2), torch.zeros(4, smallest + smallest // 2, dtype=torch.int8), scale, None, 8)


def test_the_version_is_the_installed_distributions_and_major_minor_patch():
    assert importlib.metadata.version("chatglm-cpu") == chatglm_cpu.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", chatglm_cpu.__version__)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_features", [96, 192, 13696])  # groups of 32, 64 and 128 inputs
@pytest.mark.parametrize("rows", [1, chatglm_cpu.UNPACK_ONCE_FROM_ROWS + 1])  # int4 nibbles unpacked on the way; once per chunk
def test_every_instruction_set_gives_the_same_result_bit_for_bit(bits, dtype, in_features, rows):
    if len(chatglm_cpu.isas()) < 2:
        pytest.skip(f"this CPU runs only {chatglm_cpu.isas()}")
    generator = torch.Generator().manual_seed(3)
    q = random_q(70, in_features, bits)
    scale = (torch.rand(70, generator=generator) * 0.01).to(dtype)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    outs = [chatglm_cpu.linear(x, released_bytes(q, bits), scale, None, bits, isa=isa) for isa in chatglm_cpu.isas()]
    assert all(torch.equal(out, outs[0]) for out in outs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features", [192, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # outputs rounded one at a time, or 4
def test_a_rows_result_does_not_depend_on_the_rows_batched_with_it(isa, bits, in_features, dtype):
    # Alone, in a small batch (nibbles unpacked on the way) and in a prompt-sized one (unpacked once):
    # the same bits, so a conversation's answer does not change with the server's batch.
    generator = torch.Generator().manual_seed(4)
    q = random_q(37, in_features, bits)
    scale = (torch.rand(37, generator=generator) * 0.01).to(dtype)
    x = torch.randn(12, in_features, generator=generator).to(dtype)
    weight = released_bytes(q, bits)
    alone = chatglm_cpu.linear(x[:1], weight, scale, None, bits, isa=isa)
    for rows in (3, 12):
        assert torch.equal(chatglm_cpu.linear(x[:rows], weight, scale, None, bits, isa=isa)[:1], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_non_finite_input_makes_its_own_row_nan_and_no_other(dtype):
    q = random_q(8, 64, 4)
    x = torch.randn(3, 64).to(dtype)
    x[0, 5] = float("inf")
    x[2, 63] = float("nan")
    out = chatglm_cpu.linear(x, released_bytes(q, 4), torch.ones(8), None, 4)
    assert out[0].isnan().all() and out[2].isnan().all()
    assert torch.isfinite(out[1]).all()


def test_zero_activations_give_the_bias():
    bias = torch.randn(8)
    out = chatglm_cpu.linear(torch.zeros(2, 64), released_bytes(random_q(8, 64, 4), 4), torch.ones(8), bias, 4)
    assert torch.equal(out, bias.expand(2, 8))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weight=torch.zeros(8, 33, dtype=torch.int8)), r"weight must be .*\[N, 32\]"),
        (dict(weight=torch.zeros(8, 32)), r"weight must be a contiguous CPU int8"),
        (dict(weight=torch.zeros(32, 8, dtype=torch.int8).T), r"weight must be a contiguous"),
        (dict(x=torch.zeros(2, 66), weight=torch.zeros(8, 33, dtype=torch.int8)), r"multiple of 32, got 66"),
        (dict(scale=torch.ones(7)), r"scale must be .* shape \(8,\), got .*\(7,\)"),
        (dict(bias=torch.ones(8, dtype=torch.float64)), r"bias must be a CPU float32/float16/bfloat16"),
        (dict(x=torch.zeros(2, 64, dtype=torch.int32)), r"x must be a 2-D CPU float32"),
        (dict(bits=3), r"bits must be 4 or 8, got 3"),
        (dict(isa="sse2"), r"isa must be one this CPU runs, .*avx2.*; got 'sse2'"),
    ],
)
def test_bad_arguments_are_refused_with_a_message_naming_them(change, message):
    arguments = dict(x=torch.zeros(2, 64), weight=torch.zeros(8, 32, dtype=torch.int8), scale=torch.ones(8), bias=None, bits=4)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        chatglm_cpu.linear(**arguments)


def test_a_checked_weight_gives_linears_results_and_its_copies_own_their_tensors():
    import copy
    import pickle

    q = random_q(13, 128, 4)
    weight, scale, bias = released_bytes(q, 4), torch.rand(13, dtype=torch.float16), torch.randn(13, dtype=torch.float16)
    x = torch.randn(3, 128, dtype=torch.float16)
    checked = chatglm_cpu.QuantizedWeight(weight, scale, bias, 4)
    expected = chatglm_cpu.linear(x, weight, scale, bias, 4)
    assert torch.equal(checked(x), expected)
    copies = [copy.deepcopy(checked), pickle.loads(pickle.dumps(checked))]
    del checked
    weight.zero_()  # the copies read their own tensors, not the addresses of these
    assert all(torch.equal(each(x), expected) for each in copies)
    with pytest.raises(ValueError, match=r"x must be .* of width 128, got .* shape \(3, 64\)"):
        copies[0](x[:, :64])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_an_rms_norm_given_to_the_call_is_torchs_float32_norm_applied_to_x(isa, bits, dtype, rows):
    # Integer activations: their squares add up exactly in any order, so the kernel's factor is torch's bit
    # for bit, and the normed rows (float32, never rounded to x's dtype) must quantize to the same integers.
    in_features = 256
    q = random_q(13, in_features, bits)
    weight, scale, bias = released_bytes(q, bits), torch.rand(13, dtype=torch.float16), torch.randn(13, dtype=torch.float16)
    x = integer_activations(rows, in_features).to(dtype)
    x[0] *= 2  # rows of different norms
    norm_weight = (torch.rand(in_features) + 0.5).to(dtype)
    checked = chatglm_cpu.QuantizedWeight(weight, scale, bias, bits, isa)
    normed = torch.nn.functional.rms_norm(x.float(), (in_features,), norm_weight.float(), 1e-5)
    expected = checked(normed).to(dtype)  # the float32 result, rounded once to x's dtype
    assert torch.equal(checked(x, rms_norm=(norm_weight, 1e-5)), expected)
    assert not torch.equal(checked(x, rms_norm=(norm_weight, 1e-5)), checked(x))
    with pytest.raises(ValueError, match=r"the RMSNorm weight must be .* shape \(256,\), got .* shape \(128,\)"):
        checked(x, rms_norm=(norm_weight[:128], 1e-5))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 9])
def test_swiglu_given_to_the_call_multiplies_silu_of_the_gate_times_up(isa, bits, dtype, rows):
    in_features = 384
    q = random_q(13, in_features, bits)
    weight, scale = released_bytes(q, bits), torch.rand(13, dtype=torch.float16)
    generator = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * in_features, generator=generator) * 3).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -20.0, 0.0]).to(dtype)  # silu's far ends and its zero
    if dtype != torch.float16:
        gate_up[0, 4] = -1e30  # e^-gate overflows: silu is -0, as torch's
    checked = chatglm_cpu.QuantizedWeight(weight, scale, None, bits, isa)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = checked(torch.nn.functional.silu(gate) * up).to(dtype).float()  # float32 until the output, as the kernel
    out = checked(gate_up, swiglu=True)
    assert out.dtype == dtype
    # Only e^x (the kernel's polynomial, torch's own) may move an activation's int8 rounding by one.
    assert relative_error(out.float(), expected) < 2e-3
    gate_up[-1, 7] = float("nan")
    assert checked(gate_up, swiglu=True)[-1].isnan().all()
    with pytest.raises(ValueError, match=r"x must be .* width 768 \(\[gate \| up\] for swiglu\), got .* shape \(%d, 384\)" % rows):
        checked(gate_up[:, :in_features], swiglu=True)


def relative_error(out, reference):
    return ((out - reference).norm() / reference.norm()).item()


def test_callers_on_several_threads_at_once_all_get_their_own_results():
    # Each caller's OpenMP team is its own.
    q = random_q(512, 1024, 4)
    weight = released_bytes(q, 4)
    inputs = [integer_activations(2, 1024, seed=seed) for seed in range(6)]
    expected = [(x.long() @ q.long().T).float() for x in inputs]
    results = [None] * len(inputs)

    def work(index):
        for _ in range(20):
            results[index] = chatglm_cpu.linear(inputs[index], weight, torch.ones(512), None, 4, 2)

    callers = [threading.Thread(target=work, args=(index,)) for index in range(len(inputs))]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    for result, want in zip(results, expected):
        assert torch.equal(result, want)


def _compute_in_child(queue):
    torch.set_num_threads(1)  # what DataLoader workers do: torch's own OpenMP ops hang in a fork otherwise
    q = random_q(64, 256, 4)
    x = integer_activations(1, 256)
    out = chatglm_cpu.linear(x, released_bytes(q, 4), torch.ones(64), None, 4)
    queue.put(torch.equal(out, (x.long() @ q.long().T).float()))


def test_a_forked_child_with_one_torch_thread_computes_without_the_parents_threads():
    # The kernels follow torch's thread count: with one thread they never enter the OpenMP runtime,
    # whose threads a forked child does not have.
    chatglm_cpu.linear(torch.randn(1, 256), released_bytes(random_q(64, 256, 4), 4), torch.ones(64), None, 4, 2)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_compute_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0 and queue.get(timeout=5)


# -- FloatWeight: float16 / bfloat16 weights ------------------------------------------------------


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
# blocks of 4 activation rows and what is left of them; + passes over the weight
@pytest.mark.parametrize("rows", [1, 3, 6, chatglm_cpu.FLOAT_PASS_ROWS, 2 * chatglm_cpu.FLOAT_PASS_ROWS + 3])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("out_features", [13, 301])  # a remainder; at one row, chunks of over 32 rows, shrinking
@pytest.mark.parametrize("isa", ISAS)
def test_float_weights_times_integers_give_the_exact_products(weight_dtype, x_dtype, rows, threads, out_features, isa):
    # Small integers are exact in every dtype and their products add up exactly in float32 in any order:
    # any slip in a row, a column, a chunk or the dtype conversions changes an integer.
    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-8, 9, (out_features, 256), generator=generator).to(weight_dtype)
    bias = torch.randint(-100, 100, (out_features,), generator=generator).to(weight_dtype)
    x = torch.randint(-8, 9, (rows, 256), generator=generator).to(x_dtype)
    out = chatglm_cpu.FloatWeight(weight, bias, isa=isa)(x, threads)
    assert out.dtype == x_dtype
    assert torch.equal(out, (x.long() @ weight.long().T + bias.long()).to(x_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_weights_match_torchs_linear_to_its_rounding(dtype):
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(300, 4096, generator=generator) * 0.02).to(dtype)
    x = torch.randn(2, 4096, generator=generator).to(dtype)
    exact = x.double() @ weight.double().T
    out = chatglm_cpu.FloatWeight(weight)(x)
    # float32 sums in another order than torch's: within one rounding of x's dtype of the exact product, plus
    # float32's rounding of 4096 additions of the products' magnitudes (what decides it where they cancel)
    sums_error = 4096 * torch.finfo(torch.float32).eps * (x.double().abs() @ weight.double().abs().T)
    assert ((out.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs() + sums_error).all()
    assert (out == torch.nn.functional.linear(x, weight)).float().mean() > 0.95


@pytest.mark.parametrize("isa", ISAS)
def test_a_float_weights_output_row_does_not_depend_on_the_other_rows_of_the_call(isa):
    # Every row of every pass adds its products in one order: a sequence decodes alike alone and in a batch,
    # and a prompt's positions alike in any pass.
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(70, 4096, generator=generator).to(torch.bfloat16)
    # float32 activations, so the outputs keep every bit of the float32 sums: any other order of additions shows
    x = torch.randn(2 * chatglm_cpu.FLOAT_PASS_ROWS + 5, 4096, generator=generator)
    together = chatglm_cpu.FloatWeight(weight, isa=isa)(x)
    alone = torch.cat([chatglm_cpu.FloatWeight(weight, isa=isa)(row[None]) for row in x])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, chatglm_cpu.FLOAT_PASS_ROWS + 1])  # one weight row at a time; blocks; two passes
def test_float_weights_give_the_same_bits_on_every_instruction_set(weight_dtype, rows):
    # float32 activations keep every bit of the sums: the 512-bit code must add in the AVX2 code's order.
    if len(chatglm_cpu.isas()) < 2:
        pytest.skip(f"this CPU runs only {chatglm_cpu.isas()}")
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(70, 4096, generator=generator).to(weight_dtype)
    x = torch.randn(rows, 4096, generator=generator)
    outs = [chatglm_cpu.FloatWeight(weight, isa=isa)(x) for isa in chatglm_cpu.isas()]
    assert all(torch.equal(out, outs[0]) for out in outs)


def test_a_float_weight_refuses_an_instruction_set_this_cpu_does_not_run():
    with pytest.raises(ValueError, match=r"chatglm_cpu.FloatWeight: isa must be one this CPU runs, .*; got 'avx9'"):
        chatglm_cpu.FloatWeight(torch.zeros(8, 64, dtype=torch.float16), isa="avx9")


@pytest.mark.parametrize(
    "weight, x, message",
    [
        (torch.zeros(8, 64), torch.zeros(1, 64), r"weight must be a contiguous 2-D CPU float16/bfloat16 tensor, got torch.float32"),
        (torch.zeros(64, 8, dtype=torch.float16).T, torch.zeros(1, 64), r"weight must be a contiguous"),
        (torch.zeros(8, 48, dtype=torch.float16), torch.zeros(1, 48), r"multiple of 32, got 48"),
        (torch.zeros(8, 64, dtype=torch.float16), torch.zeros(1, 32), r"x must be .* width 64, got torch.float32 of shape \(1, 32\)"),
    ],
)
def test_bad_float_weight_arguments_are_refused_with_a_message_naming_them(weight, x, message):
    with pytest.raises(ValueError, match=message):
        chatglm_cpu.FloatWeight(weight)(x)
    with pytest.raises(ValueError, match=r"chatglm_cpu.FloatWeight: bias must be .* shape \(8,\), got .* shape \(7,\)"):
        chatglm_cpu.FloatWeight(torch.zeros(8, 64, dtype=torch.float16), torch.zeros(7))


# -- attend: one query per sequence ---------------------------------------------------------------


def attention_reference(query, key, value, mask, scaling):
    """float64 softmax(scaling q K^T) V, masked keys at the lowest score (torch's masked_fill): [B, H, D]."""
    batch, heads, dim = query.shape
    groups = key.shape[1]
    key = key.double().repeat_interleave(heads // groups, dim=1)
    value = value.double().repeat_interleave(heads // groups, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", query.double() * scaling, key)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keys", [1, 5, 8, 37, 70])  # blocks of 8 keys and their remainders; tiles of 32
@pytest.mark.parametrize("dim", [72, 128])  # 72: outputs 64 at a time, then 8
@pytest.mark.parametrize("threads", [1, 3])
def test_attend_is_the_softmax_attention_of_each_head_on_its_group(dtype, keys, dim, threads):
    generator = torch.Generator().manual_seed(keys)
    query = torch.randn(2, 6, dim, generator=generator).to(dtype)
    key = torch.randn(2, 3, keys, dim, generator=generator).to(dtype)  # heads 2g and 2g + 1 read group g
    value = torch.randn(2, 3, keys, dim, generator=generator).to(dtype)
    mask = torch.rand(2, keys, generator=generator) > 0.3
    mask[:, 0] = True
    for given in (mask, None):
        out = chatglm_cpu.attend(query, key, value, given, dim**-0.5, threads)
        expected = attention_reference(query, key, value, given, dim**-0.5)
        assert out.dtype == dtype and out.shape == query.shape
        # float32 sums: within the output dtype's rounding (float32: a few of its ulps)
        tolerance = 4 * torch.finfo(dtype).eps if dtype == torch.float32 else torch.finfo(dtype).eps
        assert ((out.double() - expected).abs() <= tolerance * expected.abs().clamp_min(1)).all()


@pytest.mark.parametrize("padding", [1, 3, 8, 19, 32])  # into the same block of 8 keys or tile of 32, or past them
def test_a_sequences_attention_is_the_same_bits_left_padded_in_a_batch(padding):
    # A server's decode batch pads each sequence's cache on the left to the longest one: its attention must add
    # in the order of the sequence alone, or its greedy answer changes with whatever shares the batch.
    # float32, so the outputs keep every bit of the sums (rounding to float16 hides most of a difference, not all)
    generator = torch.Generator().manual_seed(padding)
    query = torch.randn(2, 4, 128, generator=generator)
    key, value = (torch.randn(2, 2, 45 + padding, 128, generator=generator) for _ in range(2))
    mask = torch.ones(2, 45 + padding, dtype=torch.bool)
    mask[0, :padding] = False
    alone = chatglm_cpu.attend(query[:1], key[:1, :, padding:], value[:1, :, padding:], None, 128**-0.5)
    batched = chatglm_cpu.attend(query, key, value, mask, 128**-0.5)
    assert torch.equal(batched[:1], alone)


def test_attend_without_a_key_left_attends_to_all_alike_and_a_nan_spoils_only_its_sequence():
    generator = torch.Generator().manual_seed(9)
    query, key, value = (torch.randn(shape, generator=generator) for shape in ((2, 4, 64), (2, 2, 9, 64), (2, 2, 9, 64)))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0] = False  # torch's softmax over equal (lowest) scores: the mean of the values
    out = chatglm_cpu.attend(query, key, value, mask, 0.125)
    assert torch.allclose(out[0], value[0].mean(1).repeat_interleave(2, dim=0), atol=1e-6)
    assert torch.equal(chatglm_cpu.attend(query, key[:, :, :0], value[:, :, :0], None, 0.125), torch.zeros_like(query))  # as torch's
    assert torch.equal(chatglm_cpu.attend(query, key, value, None, 0.125, -1), chatglm_cpu.attend(query, key, value, None, 0.125, 1))
    key[1, 1, 3, 0] = float("nan")
    out = chatglm_cpu.attend(query, key, value, None, 0.125)
    assert out[1, 2:].isnan().all() and torch.isfinite(out[1, :2]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(query=torch.zeros(1, 4, 64, 1)), r"query must be \[B, H, D\] and key, value \[B, G, T, D\]"),
        (dict(value=torch.zeros(1, 2, 8, 64)), r"got shapes \(1, 4, 64\), \(1, 2, 9, 64\), \(1, 2, 8, 64\)"),
        (dict(query=torch.zeros(1, 3, 64)), r"H a multiple of G, got query \(1, 3, 64\)"),
        (dict(key=torch.zeros(1, 0, 9, 64), value=torch.zeros(1, 0, 9, 64)), r"H a multiple of G, got query .* key \(1, 0, 9, 64\)"),
        (dict(query=torch.zeros(1, 4, 60), key=torch.zeros(1, 2, 9, 60), value=torch.zeros(1, 2, 9, 60)), r"D a multiple of 8"),
        (dict(value=torch.zeros(1, 2, 9, 64, dtype=torch.float16)), r"key and value alike, got torch.float32, torch.float32, torch.float16"),
        (dict(mask=torch.ones(1, 8, dtype=torch.bool)), r"mask must be a CPU bool tensor of shape \(1, 9\), got .* shape \(1, 8\)"),
    ],
)
def test_bad_attend_arguments_are_refused_with_a_message_naming_them(change, message):
    arguments = dict(query=torch.zeros(1, 4, 64), key=torch.zeros(1, 2, 9, 64), value=torch.zeros(1, 2, 9, 64), mask=None, scaling=0.125)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        chatglm_cpu.attend(**arguments)
