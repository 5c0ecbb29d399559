"""The fused dequantize-and-multiply Triton kernel of `quantization.py`, run by Triton's interpreter.

No GPU here: with `TRITON_INTERPRET=1`, `@triton.jit` builds interpreted kernels that run on CPU
tensors. Triton reads the variable when its own library is first imported (its `tl.zeros` and
friends are jitted too), so the checks run in one fresh Python process started with the variable
set: this file, run as a script. Shapes are small (the interpreter is slow) and include sizes that
are not multiples of the block sizes. What this cannot show: compilation for a real GPU, and speed.
"""

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

QUANTIZATION_PY = Path(__file__).resolve().parent.parent / "quantization.py"

# M 1 and 3 take the decode tiles (16 rows), 17 the prefill tiles (64 rows); N 40, 96 and K 200
# are not multiples of the 32/128-wide column tiles or of the 64/128-deep K tiles.
# Each on the tiles of every GPU generation that runs its dtype (bfloat16 dots need Ampere).
CAPABILITIES = {"ampere": (8, 0), "turing": (7, 5)}
MATMUL_CASES = {
    f"int{bits}-{str(dtype).removeprefix('torch.')}-M{m}-N{n}-K{k}-{generation}": (m, n, k, bits, dtype, True, generation)
    for bits in (4, 8)
    for dtype in (torch.float16, torch.bfloat16)
    for generation in CAPABILITIES
    if not (generation == "turing" and dtype == torch.bfloat16)
    for m in (1, 3, 17)
    for n, k in ((40, 64), (96, 200))
}
MATMUL_CASES.update(
    {f"int{bits}-float16-M5-N40-K64-no-bias": (5, 40, 64, bits, torch.float16, False, "ampere") for bits in (4, 8)}
)
EXACT_VALUE_CASES = {f"int{bits}": bits for bits in (4, 8)}

# Relative to the output's largest magnitude: one float16 rounding of the output; for bfloat16 the
# interpreter truncates float32 -> bfloat16 instead of rounding, up to one bfloat16 ulp (2**-7).
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def check_matmul(Q, m, n, k, bits, dtype, bias, generation):
    generator = torch.Generator().manual_seed(0)
    qweight, scale = Q.quantize_weight(torch.randn(n, k, generator=generator).to(dtype), bits)
    x = torch.randn(m, k, generator=generator).to(dtype)
    bias_tensor = torch.randn(n, generator=generator).to(dtype) if bias else None
    out = Q._triton_linear(x, qweight, scale, bias_tensor, bits, Q.triton_tiles(m, CAPABILITIES[generation]))
    expected = x.float() @ Q.dequantize_weight(qweight, scale.float(), bits).t()
    if bias:
        expected += bias_tensor.float()
    assert out.shape == (m, n) and out.dtype == dtype, (out.shape, out.dtype)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=TOLERANCE[dtype] * expected.abs().max().item())


def check_exact_values(Q, bits):
    # Every representable q (-8..7, or -127..127) in both nibbles of a byte / every byte position.
    row = torch.arange(-8, 8) if bits == 4 else torch.cat([torch.arange(-127, 128), torch.zeros(1)])
    q = torch.stack([row, row.flip(0)]).to(torch.int8)
    qweight = Q.pack_int4(q) if bits == 4 else q
    x = torch.eye(q.shape[1], dtype=torch.float16)  # out[i, r] = q[r, i] * scale[r]
    out = Q._triton_linear(x, qweight, torch.ones(2, dtype=torch.float16), None, bits, Q.triton_tiles(len(x), (8, 0)))
    assert torch.equal(out.t().to(torch.int8), q)


def run_all_in_interpreter():
    """Script mode (TRITON_INTERPRET=1): run every case, print {case: None or the traceback} as JSON."""
    import triton.language as tl
    from triton.runtime import interpreter

    # Triton 3.9's interpreter multiplies bfloat16 dot operands as their raw uint16 bit patterns.
    # Widening them to float32 first is exact, and is what a GPU's bfloat16 dot computes.
    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_widening_bfloat16(self, a, b, *args):
        a, b = (self.cast_impl(v, tl.float32) if v.dtype.scalar == tl.bfloat16 else v for v in (a, b))
        return create_dot(self, a, b, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot_widening_bfloat16

    spec = importlib.util.spec_from_file_location("chatglm_quantization_interpreted", QUANTIZATION_PY)
    Q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(Q)
    assert isinstance(Q._dequantize_matmul_kernel, interpreter.InterpretedFunction)
    checks = {("matmul", name): (check_matmul, args) for name, args in MATMUL_CASES.items()}
    checks.update({("exact", name): (check_exact_values, (bits,)) for name, bits in EXACT_VALUE_CASES.items()})
    results = {}
    for (kind, name), (check, args) in checks.items():
        try:
            check(Q, *args)
            results[f"{kind}/{name}"] = None
        except Exception:
            results[f"{kind}/{name}"] = traceback.format_exc()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    process = subprocess.run([sys.executable, __file__], env=environment, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", MATMUL_CASES)
def test_kernel_matches_dequantized_matmul_on_decode_prefill_and_ragged_shapes(interpreter_results, case):
    failure = interpreter_results[f"matmul/{case}"]
    assert failure is None, failure


@pytest.mark.parametrize("case", EXACT_VALUE_CASES)
def test_kernel_reads_every_nibble_and_byte_value_exactly(interpreter_results, case):
    failure = interpreter_results[f"exact/{case}"]
    assert failure is None, failure


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run by the tests with TRITON_INTERPRET=1 set before triton is imported")
    run_all_in_interpreter()
