"""The CUDA kernels against the reference where the property tests' small shapes do not reach:
chunk and launch boundaries (65,536-element chunks, 320 blocks and ~50 tensors per launch),
unaligned views (scalar path) beside aligned ones (128-bit path), determinism, opcheck on
CUDA, the fused optimizers over many steps, and MAS end to end on a GPU. Every op on random
small shapes, dtypes and strides is covered by tests/test_properties.py on each device.
"""
import pytest
import torch

from mas_fast import MAS, ops, optim
from mas_fast.ops import reference
import multi_tensor_cases
from models import make_case
from multi_tensor_cases import MANY_SIZES, SIZES
from tolerances import assert_close

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"),
    pytest.mark.skipif(ops.backend_status()["cuda"] is not None,
                       reason=f"cuda backend unavailable: {ops.backend_status()['cuda']}"),
]
DEV = "cuda"


def terms(sizes, dtype, seed=0, offset=0, lean=False):
    return multi_tensor_cases.terms(sizes, dtype, DEV, seed, offset, lean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("offset", [0, 1])
def test_penalty_and_grad_across_chunk_and_launch_boundaries(dtype, offset):
    params, grads, stars, omegas = terms(SIZES, dtype, offset=offset)
    want_grads = [g.clone() for g in grads]
    want = reference.penalty_and_grad_(params, want_grads, stars, omegas, 0.7)
    got = ops.penalty_and_grad_(params, grads, stars, omegas, 0.7, backend="cuda")
    assert got.device.type == "cuda"
    assert_close(got, want, torch.float64 if dtype == torch.float64 else torch.float32)
    for a, b in zip(grads, want_grads):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1])
def test_lean_state_on_the_gpu(dtype, offset):
    """θ* in the parameters' dtype and Ω in bf16: penalty_and_grad_, the penalty's backward and a
    fused AdamW step against the reference on the same lean state, across the boundaries."""
    params, grads, stars, omegas = terms(SIZES[:-1], dtype, offset=offset, lean=True)
    want_grads = [g.clone() for g in grads]
    want = reference.penalty_and_grad_(params, want_grads, stars, omegas, 0.7)
    got = ops.penalty_and_grad_(params, grads, stars, omegas, 0.7, backend="cuda")
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want, torch.float32)
    for a, b in zip(grads, want_grads):
        assert_close(a, b, dtype)
    leaves = [p.clone().requires_grad_() for p in params]
    got_g = torch.autograd.grad(ops.penalty(leaves, stars, omegas, 0.9, backend="cuda"), leaves)
    want_g = torch.autograd.grad(reference.penalty(leaves, stars, omegas, 0.9), leaves)
    for a, b in zip(got_g, want_g):
        assert_close(a, b, dtype)
    config = ops.AdamConfig(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, penalty_step="proximal")
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    runs = {}
    for backend in ("cuda", "reference"):
        ps, m, v = [p.clone() for p in params], *([t.clone() for t in s] for s in state)
        value = ops.adam_step_(ps, grads, m, v, [], [torch.zeros(()) for _ in ps], stars, omegas, 0.7, config,
                               backend=backend)
        runs[backend] = value, ps
    assert_close(runs["cuda"][0], runs["reference"][0], torch.float32)
    for a, b in zip(runs["cuda"][1], runs["reference"][1]):
        assert_close(a, b, dtype)


def test_many_tensors_take_several_launches():
    params, grads, stars, omegas = terms(MANY_SIZES, torch.float32)
    want = reference.penalty(params, stars, omegas, 1.3)
    assert_close(ops.penalty(params, stars, omegas, 1.3, backend="cuda"), want, torch.float32)


def test_penalty_is_deterministic():
    params, grads, stars, omegas = terms([SIZES[-1], 999], torch.float32)
    first = ops.penalty(params, stars, omegas, 0.5, backend="cuda")
    assert all(torch.equal(first, ops.penalty(params, stars, omegas, 0.5, backend="cuda")) for _ in range(3))


def test_penalty_backward_matches_autograd():
    params, _, stars, omegas = terms([70000, 33], torch.float32)
    leaves = [p.clone().requires_grad_() for p in params]
    got = torch.autograd.grad(ops.penalty(leaves, stars, omegas, 0.9, backend="cuda") * 3.0, leaves)
    want = torch.autograd.grad(reference.penalty(leaves, stars, omegas, 0.9) * 3.0, leaves)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("op", ["merge_", "running_mean_update_"])
def test_state_ops_across_boundaries(op):
    g = torch.Generator(device=DEV).manual_seed(1)
    dst = [torch.rand(n, device=DEV, generator=g) for n in SIZES]
    src = [torch.rand(n, device=DEV, generator=g) for n in SIZES]
    comp = [torch.zeros(n, device=DEV) for n in SIZES]
    want, want_comp = [d.clone() for d in dst], [c.clone() for c in comp]
    if op == "merge_":
        reference.merge_(want, src, 0.3, 0.7)
        ops.merge_(dst, src, 0.3, 0.7, backend="cuda")
    else:
        reference.running_mean_update_(want, want_comp, src, 100, 7)
        ops.running_mean_update_(dst, comp, src, 100, 7, backend="cuda")
    for a, b in zip(dst, want):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_abs_sum_strided(dtype):
    g = torch.Generator(device=DEV).manual_seed(2)
    delta = torch.randn(37, 11, 300, device=DEV, generator=g).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    scale = torch.randn(37, 11, 300, device=DEV, generator=g)
    for s in (None, scale):
        want = reference.per_sample_abs_sum(delta, s)
        assert_close(ops.per_sample_abs_sum(delta, s, backend="cuda"), want,
                     torch.float32 if dtype == torch.float32 else dtype)


def test_opcheck_on_cuda():
    params, grads, stars, omegas = terms([70000, 5], torch.float32)
    lib = torch.ops.mas_fast
    torch.library.opcheck(lib.penalty, ([p.clone().requires_grad_() for p in params], stars, omegas, 0.5))
    torch.library.opcheck(lib.penalty_and_grad_, (params, [g.clone() for g in grads], stars, omegas, 0.5))
    torch.library.opcheck(lib.merge_, ([o.clone() for o in omegas], stars, 0.5, 0.5))
    torch.library.opcheck(lib.running_mean_update_, ([o.clone() for o in omegas], [torch.zeros_like(o) for o in omegas],
                                                      stars, 3, 2))
    torch.library.opcheck(lib.per_sample_abs_sum, (torch.randn(4, 3, 5, device=DEV), None))


@pytest.mark.parametrize("name,kwargs", [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
])
def test_fused_optimizers_follow_torch_optim_with_the_autograd_penalty(name, kwargs):
    model, x = make_case("mlp", dtype=torch.float32)
    model, x = model.to(DEV), x.to(DEV)
    twin = make_case("mlp", dtype=torch.float32)[0].to(DEV)
    twin.load_state_dict(model.state_dict())
    mas, mas_twin = MAS(model, lambda_=2.0), MAS(twin, lambda_=2.0, backend="reference")
    mas.consolidate([x], progress=False)
    mas_twin.consolidate([x], progress=False)
    fused = getattr(optim, name)(model.parameters(), **kwargs, regularizer=mas, backend="cuda")
    plain = getattr(torch.optim, name)(twin.parameters(), **kwargs)
    for _ in range(20):
        fused.zero_grad()
        model(x).square().mean().backward()
        fused.step()
        plain.zero_grad()
        (twin(x).square().mean() + mas_twin.penalty()).backward()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_close(a.detach(), b.detach(), torch.float32)


@pytest.mark.parametrize("case", ["mlp", "cnn", "seq"])
def test_mas_on_gpu_matches_cpu_reference(case):
    model, x = make_case(case, dtype=torch.float32)
    cpu = MAS(model, backend="reference")
    cpu.consolidate([x], progress=False)
    gpu_model = make_case(case, dtype=torch.float32)[0].to(DEV)
    gpu_model.load_state_dict(model.state_dict())
    gpu = MAS(gpu_model)  # auto: cuda / triton kernels where they apply
    gpu.consolidate([x.to(DEV)], progress=False)
    for n, v in cpu.importance.items():
        assert_close(gpu.importance[n].cpu(), v, torch.float32, n)
