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
