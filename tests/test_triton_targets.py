"""The Triton kernel compiled ahead of time for each GPU generation, on a machine with no GPU.

Triton's wheel carries NVIDIA's ptxas, so the cubin a T4, A100, RTX 30/40 or H100 would load is
built here from the tiles quantization.py chooses for it. What this guards: every tile shape
compiles for every target, fits the target's shared memory, and keeps its registers (no stack:
spilled registers go to slow local memory). Speed and the results on hardware need the GPU
(tests/test_cuda.py, bench/gpu_check.sh).
"""

import pytest

triton = pytest.importorskip("triton")

from bench import triton_targets  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def Q(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        yield triton_targets.load_quantization()


@pytest.mark.parametrize(
    "capability, dtype, bits, phase",
    triton_targets.cases(),
    ids=lambda value: str(value).removeprefix("torch."),
)
def test_kernel_compiles_for_the_target_without_spilling_and_fits_its_shared_memory(Q, capability, dtype, bits, phase):
    kernel = triton_targets.compile_kernel(Q, capability, dtype, bits, phase)
    assert kernel["cubin_bytes"] > 0
    assert kernel["stack_bytes"] == 0 and kernel["local_bytes"] == 0, kernel
    assert 0 < kernel["registers"] <= 255, kernel
    assert 0 < kernel["shared_bytes"] <= kernel["shared_limit"], kernel


def test_every_target_generation_and_phase_has_its_tiles(Q):
    phases = {"decode": 1, "prefill": 17}
    for capability in triton_targets.TARGETS:
        for phase, rows in phases.items():
            generation = "ampere" if capability >= (8, 0) else "turing"
            assert Q.triton_tiles(rows, capability) == Q.TRITON_TILES[phase, generation]
    assert Q.triton_tiles(16, (8, 0)) == Q.TRITON_TILES["decode", "ampere"]
