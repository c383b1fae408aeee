"""Tensor lists that cross the CUDA launcher's boundaries, shared by the GPU tests
(test_cuda_ops.py) and the emulated ones (test_cuda_emulated.py)."""
import torch

from mas_fast.ops import reference

CHUNK = 65536  # elements per block (csrc/cuda/multi_tensor.cuh kChunk)
BLOCKS_PER_LAUNCH = 320
# Around the chunk, odd and not multiples of 4 (the scalar path), and one spanning more than
# one launch's blocks, so a tensor continues into the next launch.
SIZES = [1, 3, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3, (BLOCKS_PER_LAUNCH + 1) * CHUNK + 5]
# More tensors than one launch holds (~50 for the penalty), with empty ones in between.
MANY_SIZES = [(5 + i % 7) * (i % 13 != 0) for i in range(300)]


def terms(sizes, dtype, device, seed=0, offset=0):
    """params, grads, θ*, Ω; with an element `offset`, params and grads are unaligned views."""
    g = torch.Generator(device=device).manual_seed(seed)
    acc = reference.acc_dtype(dtype)
    params = [torch.randn(n + offset, device=device, generator=g).to(dtype)[offset:] for n in sizes]
    grads = [torch.randn(n + offset, device=device, generator=g).to(dtype)[offset:] for n in sizes]
    stars = [p.to(acc) + 0.1 * torch.randn(p.shape, device=device, generator=g, dtype=acc) for p in params]
    omegas = [torch.rand(p.shape, device=device, generator=g, dtype=acc) for p in params]
    return params, grads, stars, omegas
