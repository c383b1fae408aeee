"""Per-dtype tolerances, kept in one place (atol is relative to the reference's max |value|)."""
import torch

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """allclose with the dtype's tolerance; atol scales with the reference's magnitude."""
    tol = TOL[dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol["rtol"],
                               atol=tol["atol"] * scale, msg=lambda m: f"{msg}: {m}")


# Absolute floor of the low-precision check, relative to the reference's magnitude: covers
# cases where the same-dtype PyTorch result happens to be exact.
LOWP_FLOOR = 1e-6


def assert_close_lowp(actual: torch.Tensor, expected64: torch.Tensor, same_dtype: torch.Tensor,
                      msg: str = "") -> None:
    """Flash-attention-style check for bf16/fp16 inputs: the kernel's max error against an
    fp64 reference is at most 2× that of a same-dtype PyTorch computation, plus a tiny floor."""
    if not expected64.numel():
        assert actual.shape == expected64.shape, msg
        return
    scale = max(expected64.abs().max().item(), 1.0)
    err = (actual.double() - expected64).abs().max().item()
    base = (same_dtype.double() - expected64).abs().max().item()
    assert err <= 2 * base + LOWP_FLOOR * scale, (
        f"{msg}: error {err:.3g} vs fp64 exceeds 2 × same-dtype PyTorch error {base:.3g} "
        f"+ floor {LOWP_FLOOR * scale:.3g}")
