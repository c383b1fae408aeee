"""Per-sample proxies for parameters a container uses itself with a leading dimension of 1.

timm's ViT holds `cls_token` (1, 1, D) and `pos_embed` (1, N, D) and uses them by
broadcasting against the batch (`cls_token.expand(B, -1, -1)`, `x + pos_embed`). During the
pass such a parameter is replaced by a proxy of shape (B, ...), every row a copy of it:
the forward computes the same output, and row k of the proxy's gradient is sample k's
gradient g_k, so Σ_k |g_k| comes out of the ordinary backward, without running the
container once per sample. That holds only when the rows are used by broadcasting against
the samples; the first time a proxy is used (with verification on), its Σ_k |g_k| is
compared with the container's module-local path and the plain forward's output, and a
parameter that fails keeps the module-local path.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .capture import Site
from ..ops.policy import acc_dtype

Tensor = torch.Tensor


@dataclass(eq=False)
class Proxy:
    site: Site
    attr: str        # the container's own attribute
    name: str        # canonical parameter name
    tensor: Tensor   # (B, ...) copies of the parameter, a leaf that requires grad
    checking: bool   # first use: compared with the module-local path on this batch


def proxies_for(sites: list[Site], params: dict[str, Tensor], batch: int, ok: set[str], refused: set[str],
                verify: bool) -> list[Proxy]:
    """Proxies for the direct parameters of module-local container sites with a leading
    dimension of size 1; parameters already accepted leave their site (which is dropped
    when nothing remains). None without verification: a proxy is used only once checked."""
    out = []
    if batch < 2 or not verify:  # a proxy is only used once checked
        return out
    for s in sites:
        if not s.local or s.shared or next(s.module.children(), None) is None:  # containers only
            continue
        for attr, name in list(s.params.items()):
            p = params[name]
            if "." in attr or p.dim() == 0 or p.shape[0] != 1 or name in refused:
                continue
            checking = name not in ok
            tensor = p.detach().expand(batch, *p.shape[1:]).clone().requires_grad_(True)
            out.append(Proxy(s, attr, name, tensor, checking))
            if not checking:
                del s.params[attr]
    return out


@contextmanager
def substituted(proxies: list[Proxy]) -> Iterator[None]:
    """The proxies in place of their parameters for the duration of a forward."""
    saved = [(x.site.module, x.attr, x.site.module._parameters[x.attr]) for x in proxies]
    try:
        for x in proxies:
            x.site.module._parameters[x.attr] = x.tensor
        yield
    finally:
        for module, attr, p in saved:
            module._parameters[attr] = p


def proxy_sums(x: Proxy, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Σ_k |g_k|, Σ_k g_k) from the proxy's gradient, shaped like the parameter."""
    dt = acc_dtype(x.tensor.dtype)
    if grad is None:
        zero = torch.zeros((1, *x.tensor.shape[1:]), dtype=dt, device=x.tensor.device)
        return zero, zero.clone()
    g = grad.to(dt)
    return g.abs().sum(0, keepdim=True), g.sum(0, keepdim=True)


__all__ = ["Proxy", "proxies_for", "proxy_sums", "substituted"]
