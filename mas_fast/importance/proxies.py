"""Per-sample proxies for parameters a container uses itself by broadcasting against the batch.

timm's ViT holds `cls_token` (1, 1, D) and `pos_embed` (1, N, D) and uses them by
broadcasting against the batch (`cls_token.expand(B, -1, -1)`, `x + pos_embed`). During the
pass such a parameter is replaced by a proxy of shape (B, ...), every row a copy of it:
the forward computes the same output, and row k of the proxy's gradient is sample k's
gradient g_k, so Σ_k |g_k| comes out of the ordinary backward, without running the
container once per sample.

A parameter without a leading 1, such as timm ConvNeXt's block-held layer scale γ (C,),
used as `x.mul(gamma.reshape(1, -1, 1, 1))`, gets a (B, C) proxy that stands in for γ as
a `SampleRows` tensor: its one supported use is a reshape to a shape with a leading 1,
which returns the rows as (B, ...); any other use fails the forward, and the parameter
keeps the module-local path.

Either proxy holds only when the rows are used by broadcasting against the samples; the
first time a proxy is used (with verification on), its Σ_k |g_k| is compared with the
container's module-local path and the plain forward's output, and a parameter that fails
keeps the module-local path.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .capture import Site
from ..ops.policy import acc_dtype

Tensor = torch.Tensor


_RESHAPES = (Tensor.reshape, Tensor.view, torch.reshape)


class SampleRows(Tensor):
    """A (B, *shape) proxy standing in for a parameter of `shape`: reshaped to (1, *rest) it
    gives its rows as (B, *rest), one per sample; attribute reads pass; any other use raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":  # .dtype, .device, .requires_grad, ...
            return super().__torch_function__(func, types, args, kwargs)
        if func in _RESHAPES and isinstance(args[0], SampleRows) and not kwargs:
            shape = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
            if len(shape) >= 1 and shape[0] == 1:
                rows = args[0].as_subclass(Tensor)
                return rows.reshape(rows.shape[0], *shape[1:])
        raise TypeError(f"a per-sample proxy supports only a reshape to a leading 1, not {func}")


@dataclass(eq=False)
class Proxy:
    site: Site
    attr: str        # the container's own attribute
    name: str        # canonical parameter name
    tensor: Tensor   # (B, ...) copies of the parameter, a leaf that requires grad
    checking: bool   # first use: compared with the module-local path on this batch
    shape: torch.Size  # the parameter's
    stand_in: Tensor   # what the container sees in the parameter's place: tensor, or SampleRows of it


def proxies_for(sites: list[Site], params: dict[str, Tensor], batch: int, ok: set[str], refused: set[str],
                verify: bool) -> list[Proxy]:
    """Proxies for the direct parameters of module-local container sites: (B, ...) rows for a
    leading dimension of size 1, SampleRows of (B, *shape) otherwise; parameters already
    accepted leave their site (which is dropped when nothing remains). None without
    verification: a proxy is used only once checked."""
    out = []
    if batch < 2 or not verify:  # a proxy is only used once checked
        return out
    for s in sites:
        if not s.local or s.shared or next(s.module.children(), None) is None:  # containers only
            continue
        for attr, name in list(s.params.items()):
            p = params[name]
            if "." in attr or p.dim() == 0 or name in refused:
                continue
            checking = name not in ok
            leading_one = p.shape[0] == 1
            rows = p.detach().expand(batch, *p.shape[1:]) if leading_one else p.detach().expand(batch, *p.shape)
            tensor = rows.clone().requires_grad_(True)
            stand_in = tensor if leading_one else tensor.as_subclass(SampleRows)
            out.append(Proxy(s, attr, name, tensor, checking, p.shape, stand_in))
            if not checking:
                del s.params[attr]
    return out


@contextmanager
def substituted(proxies: list[Proxy]) -> Iterator[None]:
    """The proxies in place of their parameters for the duration of a forward."""
    saved = [(x.site.module, x.attr, x.site.module._parameters[x.attr]) for x in proxies]
    try:
        for x in proxies:
            x.site.module._parameters[x.attr] = x.stand_in
        yield
    finally:
        for module, attr, p in saved:
            module._parameters[attr] = p


def proxy_sums(x: Proxy, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Σ_k |g_k|, Σ_k g_k) from the proxy's gradient, shaped like the parameter."""
    dt = acc_dtype(x.tensor.dtype)
    if grad is None:
        zero = torch.zeros(x.shape, dtype=dt, device=x.tensor.device)
        return zero, zero.clone()
    g = grad.to(dt)
    return g.abs().sum(0).reshape(x.shape), g.sum(0).reshape(x.shape)


__all__ = ["Proxy", "SampleRows", "proxies_for", "proxy_sums", "substituted"]
