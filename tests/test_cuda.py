"""On a CUDA GPU (`pytest -m cuda`; skipped elsewhere): the Triton kernel compiled for real, and a
quantized model on the GPU. `bench/gpu_check.sh` runs these with the GPU benchmark.

The interpreter tests (test_triton_kernels.py) check the kernel's arithmetic on the CPU; what only a
GPU shows is that it compiles there and that the model runs on it end to end.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from tiny_checkpoint import random_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QUANTIZATION_PY = Path(__file__).resolve().parent.parent / "quantization.py"


@pytest.fixture(scope="module")
def Q():
    spec = importlib.util.spec_from_file_location("chatglm_quantization_on_cuda", QUANTIZATION_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", [(1, 40, 64), (3, 96, 200), (17, 96, 200), (130, 4608, 4096)])
def test_compiled_triton_kernel_matches_the_dequantized_matmul(Q, bits, dtype, m, n, k):
    if not Q._HAS_TRITON:
        pytest.skip("triton is not installed")
    minimum = (8, 0) if dtype == torch.bfloat16 else (7, 5)
    if torch.cuda.get_device_capability() < minimum:
        pytest.skip(f"{dtype} tensor-core dots need compute capability {minimum}")
    generator = torch.Generator().manual_seed(0)
    qweight, scale = Q.quantize_weight(torch.randn(n, k, generator=generator).to(dtype), bits)
    x = torch.randn(m, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    out = Q._triton_linear(x.cuda(), qweight.cuda(), scale.cuda(), bias.cuda(), bits)
    expected = x.float() @ Q.dequantize_weight(qweight, scale.float(), bits).t() + bias.float()
    tolerance = 1e-3 if dtype == torch.float16 else 1e-2
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_on_the_gpu_generates_like_its_own_forward_and_close_to_the_cpu(tmp_path, bits):
    random_model(tmp_path, 160, add_qkv_bias=True).save_pretrained(tmp_path)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=dtype).eval()
    model = model.quantize(bits, device="cuda").cuda()
    assert model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.device.type == "cuda"
    cpu = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval().quantize(bits)
    ids = torch.randint(3, 160, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        generated = model.generate(ids.cuda(), max_new_tokens=4, do_sample=False)
        sequence = ids.cuda()
        for _ in range(4):
            sequence = torch.cat((sequence, model(sequence).logits[:, -1:].argmax(-1)), dim=1)
        assert torch.equal(generated, sequence)
        logits, reference = model(ids.cuda()).logits.float().cpu(), cpu(ids).logits
    assert ((logits - reference).norm() / reference.norm()).item() < 0.05
