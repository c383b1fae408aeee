"""Tensor lists that cross the CUDA launcher's boundaries, shared by the GPU tests
(test_cuda_ops.py) and the emulated ones (test_cuda_emulated.py)."""
import torch

from cuda_emulator import guarded
from mas_fast.ops import policy, reference

CHUNK = 65536  # elements per block (csrc/cuda/multi_tensor.cuh kChunk)
BLOCKS_PER_LAUNCH = 320
# Around the chunk, odd and not multiples of 4 (the scalar path), CHUNK + 8 (a last chunk on
# the 128-bit path shorter than one block step), and one spanning more than one launch's
# blocks, so a tensor continues into the next launch.
SIZES = [1, 3, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK + 8, 2 * CHUNK + 3, (BLOCKS_PER_LAUNCH + 1) * CHUNK + 5]
# More tensors than one launch holds (~50 for the penalty), with empty ones in between.
MANY_SIZES = [(5 + i % 7) * (i % 13 != 0) for i in range(300)]


def terms(sizes, dtype, device, seed=0, offset=0, lean=False):
    """params, grads, θ*, Ω, each a guarded view `offset` elements into its buffer (unaligned
    for an odd offset); θ*/Ω in the accumulation dtype, or with `lean` θ* in `dtype` and Ω in
    bfloat16 (the lean state)."""
    g = torch.Generator(device=device).manual_seed(seed)
    acc = policy.acc_dtype(dtype)
    star_dtype, omega_dtype = (dtype, policy.LEAN_OMEGA_DTYPE) if lean else (acc, acc)

    def randn(n, dt):
        return torch.randn(n, device=device, generator=g, dtype=dt)

    params = [guarded(randn(n, torch.float32).to(dtype), offset) for n in sizes]
    grads = [guarded(randn(n, torch.float32).to(dtype), offset) for n in sizes]
    stars = [guarded((p.to(acc) + 0.1 * randn(p.numel(), acc)).to(star_dtype), offset) for p in params]
    omegas = [guarded(torch.rand(p.numel(), device=device, generator=g, dtype=acc).to(omega_dtype), offset)
              for p in params]
    return params, grads, stars, omegas
