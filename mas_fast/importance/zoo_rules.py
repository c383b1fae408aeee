"""Exact rules for the layers of the common model libraries (Hugging Face, timm).

These libraries define their own layers instead of subclassing torch's: GPT-2's `Conv1D`
(a Linear with the weight transposed), RMSNorm as Llama, T5, Gemma, OLMo2, Helium, Llama 4
and Gemma 3n spell it and Cohere's bias-free LayerNorm (each copied into many model files),
timm's `LayerNorm` / `LayerNorm2d` and `LayerScale(2d)`.

A layer is recognised by the code it runs, never by its name: `KnownForward` compares
the layer's `forward` (and the methods it calls) with a reference copy of the library's
implementation kept here — bytecode, constants and names, so a renamed local or a
docstring does not matter but any change to what is computed does. A subclass that
overrides `forward`, a library version that changes it, or a hub kernel swapped in,
no longer matches and goes to the generic path. Importing this module imports neither
library. The reference copies are code to compare against, never called.

Every rule returns {attribute: Σ_k |g_k|}; its `signed` twin returns {attribute: Σ_k g_k},
the batch gradient, which verification compares with autograd.
"""
from __future__ import annotations

import types
import weakref
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.policy import acc_dtype
from .rules import _affine, _batched, _bias_and_weight, _signed_bias_and_weight, layer_norm_rule

Tensor = torch.Tensor


# --------------------------------------------------------------------------- recognition


# co_flags bits that describe the code (locals, varargs, generator, coroutine); not CO_NESTED
# (where the function was defined) nor the higher bits, which record the defining file's
# `from __future__` imports: neither changes what the bytecode computes.
_CODE_KIND_FLAGS = 0x3FF & ~0x10


def _code_fingerprint(code: types.CodeType) -> tuple:
    """What a code object computes: bytecode, constants (nested code recursively), names and
    signature shape; not its local names, line numbers or docstring (constant 0)."""
    consts = tuple(_code_fingerprint(c) if isinstance(c, types.CodeType) else (type(c), c)
                   for c in code.co_consts)
    if consts and consts[0][0] in (str, type(None)):
        consts = (None,) + consts[1:]
    return (code.co_code, consts, code.co_names, code.co_argcount, code.co_posonlyargcount,
            code.co_kwonlyargcount, code.co_nlocals, code.co_flags & _CODE_KIND_FLAGS, code.co_freevars,
            code.co_cellvars)


class KnownForward:
    """Matches modules of type `base` whose methods named in `reference` run the same code.

    `reference` is a class holding copies of the library's methods (`forward` and the
    helpers it calls); an instance-level override of any of them never matches.
    """

    def __init__(self, reference: type, base: type = nn.Module):
        self.base = base
        self.name = reference.__name__
        self.methods = {name: _code_fingerprint(fn.__code__) for name, fn in vars(reference).items()
                        if isinstance(fn, types.FunctionType)}
        # verdict per (method name, function object): each function is fingerprinted once;
        # a method reassigned on the class is a new function, so it is checked afresh
        self._verdicts: dict[str, weakref.WeakKeyDictionary] = {n: weakref.WeakKeyDictionary() for n in self.methods}

    def __call__(self, module: nn.Module) -> bool:
        if not isinstance(module, self.base):
            return False
        for name, fingerprint in self.methods.items():
            fn = getattr(type(module), name, None)
            if name in vars(module) or not isinstance(fn, types.FunctionType):
                return False
            verdicts = self._verdicts[name]
            if fn not in verdicts:
                verdicts[fn] = _code_fingerprint(fn.__code__) == fingerprint
            if not verdicts[fn]:
                return False
        return True

    def __repr__(self) -> str:
        return f"KnownForward({self.name})"


# Reference copies of the library code (transformers 4.x-5.x, timm 1.x), compared, never run.

class HFConv1D:  # transformers.pytorch_utils.Conv1D
    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


class LlamaRMSNorm:  # LlamaRMSNorm and its "Copied from" twins (Mistral, Qwen2, Phi3, ...)
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class T5LayerNorm:  # T5LayerNorm and its twins (LongT5, Pix2Struct, ...)
    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class GemmaRMSNorm:  # GemmaRMSNorm and its twins: scale (1 + weight), product in fp32
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class Olmo2RMSNorm:  # OLMo2, GPT-OSS, ...: (w · x̂) in fp32, then cast to the input dtype
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


class HeliumRMSNorm:  # Helium, ...: as OLMo2 with the weight upcast explicitly
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)


class Llama4TextRMSNorm:  # Llama 4, ...: x̂ cast to the input dtype, then scaled
    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Gemma3nRMSNorm:  # Gemma 3n / 4, ...: x̂ = x (mean x² + eps)^(-1/2) in fp32, optional scale
    def forward(self, hidden_states):
        normed_output = self._norm(hidden_states.float())
        if self.with_scale:
            normed_output = normed_output * self.weight.float()
        return normed_output.type_as(hidden_states)

    def _norm(self, hidden_states):
        mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps
        return hidden_states * torch.pow(mean_squared, -0.5)


class CohereLayerNorm:  # Cohere, ...: LayerNorm without bias, in fp32
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        mean = hidden_states.mean(-1, keepdim=True)
        variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
        hidden_states = (hidden_states - mean) * torch.rsqrt(variance + self.variance_epsilon)
        hidden_states = self.weight.to(torch.float32) * hidden_states
        return hidden_states.to(input_dtype)


class TimmLayerNorm:  # timm.layers.LayerNorm
    def forward(self, x):
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # noqa: F821
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x


class TimmLayerNorm2d:  # timm.layers.LayerNorm2d: LayerNorm over C of (B, C, H, W)
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # noqa: F821
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class TimmLayerScale:  # timm.layers.LayerScale: channels last
    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class TimmLayerScale2d:  # timm.layers.LayerScale2d: channels first
    def forward(self, x):
        gamma = self.gamma.view(1, -1, 1, 1)
        return x.mul_(gamma) if self.inplace else x * gamma


# --------------------------------------------------------------------------- signed sums


def _signed_sum(delta: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Σ_k Σ_t δ_ktc (· s_ktc) for (B, T, C) → (C,): the batch gradient of a bias / affine scale."""
    dt = acc_dtype(delta.dtype, *(() if scale is None else (scale.dtype,)))
    d = delta.to(dt)
    return (d if scale is None else d * scale.to(dt)).sum((0, 1))


def _signed_affine(module: nn.Module, x_hat: Tensor, delta: Tensor, channels_last: bool,
                   wanted: frozenset) -> dict:
    """Signed twin of rules._affine: γ gets Σ δ x̂, β gets Σ δ."""
    B = delta.shape[0]
    shape = (module.weight if module.weight is not None else module.bias).shape
    if channels_last:
        C = shape.numel()
        d3, s3 = delta.reshape(B, -1, C), x_hat.reshape(B, -1, C)
    else:
        C = delta.shape[1]
        d3, s3 = delta.reshape(B, C, -1).transpose(1, 2), x_hat.reshape(B, C, -1).transpose(1, 2)
    out = {}
    if "weight" in wanted:
        out["weight"] = _signed_sum(d3, s3).reshape(shape)
    if "bias" in wanted:
        out["bias"] = _signed_sum(d3).reshape(shape)
    return out


# --------------------------------------------------------------------------- HF Conv1D


def hf_conv1d_rule(module: nn.Module, x: Tensor, delta: Tensor, wanted: frozenset, backend: str) -> dict:
    """GPT-2's Conv1D, y = x W + b with W (in, out): a Linear whose weight is transposed."""
    _batched(module, x, 2)
    if x.dim() == 2:
        return _bias_and_weight(module, wanted, delta.unsqueeze(1),
                                lambda: ops.abs_matmul(x, delta, backend=backend), backend)
    B = x.shape[0]
    x3, d3 = x.reshape(B, -1, x.shape[-1]), delta.reshape(B, -1, delta.shape[-1])
    return _bias_and_weight(
        module, wanted, d3,
        lambda: ops.per_sample_abs_matmul(x3.unsqueeze(1), d3.unsqueeze(1), backend=backend)[0], backend)


def _hf_conv1d_signed(module, x, delta, wanted, backend) -> dict:
    _batched(module, x, 2)
    dt = acc_dtype(x.dtype, delta.dtype)
    x2, d2 = x.reshape(-1, x.shape[-1]).to(dt), delta.reshape(-1, delta.shape[-1]).to(dt)
    out = {}
    if "weight" in wanted:
        out["weight"] = x2.t() @ d2
    if "bias" in wanted:
        out["bias"] = d2.sum(0)
    return out


hf_conv1d_rule.signed = _hf_conv1d_signed


def _hf_conv1d_per_sample(module, x, delta, wanted) -> dict:
    """Per-sample gradients, samples first: weight (c, in, out) = Σ_t x_kt δ_ktᵀ, bias (c, out)."""
    dt = acc_dtype(x.dtype, delta.dtype)
    c = x.shape[0]
    d3 = delta.reshape(c, -1, delta.shape[-1]).to(dt)
    return _signed_bias_and_weight(
        wanted, d3, lambda: x.reshape(c, -1, x.shape[-1]).to(dt).transpose(1, 2) @ d3, positions=1)


_hf_conv1d_per_sample.attrs = frozenset({"weight", "bias"})
hf_conv1d_rule.per_sample = _hf_conv1d_per_sample
hf_conv1d_rule.sample_dims = lambda m, x: range(x.dim() - 1)


# --------------------------------------------------------------------------- RMSNorm spellings
# Each spelling's rule is the affine rule on its own x̂ = ∂y/∂w, computed with the same ops and
# dtypes as the library's forward (fp32 statistics, casts where the library casts).


def _rms_normalised(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _llama_x_hat(module: nn.Module, x: Tensor) -> Tensor:
    # fp32 statistics for any input dtype (fp64 included), x̂ rounded back to the input's dtype
    return _rms_normalised(x.to(torch.float32), module.variance_epsilon).to(x.dtype)


def _t5_x_hat(module: nn.Module, x: Tensor) -> Tensor:
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x_hat = x * torch.rsqrt(variance + module.variance_epsilon)
    return x_hat.to(module.weight.dtype) if module.weight.dtype in (torch.float16, torch.bfloat16) else x_hat


def _gemma_x_hat(module: nn.Module, x: Tensor) -> Tensor:
    # y = x̂ (1 + w): ∂y/∂w = x̂, computed in fp32 whatever the input dtype
    return _rms_normalised(x.float(), module.eps)


def _olmo2_x_hat(module: nn.Module, x: Tensor) -> Tensor:
    return _rms_normalised(x.to(torch.float32), module.variance_epsilon)


def _llama4_x_hat(module: nn.Module, x: Tensor) -> Tensor:
    return _rms_normalised(x.float(), module.eps).type_as(x)


def _gemma3n_x_hat(module: nn.Module, x: Tensor) -> Tensor:
    xf = x.float()
    return xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + module.eps, -0.5)  # pow, not rsqrt: same bits


def _cohere_x_hat(module: nn.Module, x: Tensor) -> Tensor:
    xf = x.to(torch.float32)
    centred = xf - xf.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)


def _rms_rule(name: str, x_hat_fn: Callable[[nn.Module, Tensor], Tensor], doc: str):
    def rule(module, x, delta, wanted, backend) -> dict:
        _batched(module, x, 2)
        return _affine(module, x_hat_fn(module, x), delta, True, wanted, backend)

    def signed(module, x, delta, wanted, backend) -> dict:
        _batched(module, x, 2)
        return _signed_affine(module, x_hat_fn(module, x), delta, True, wanted)

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = doc
    rule.signed = signed
    rule.sample_dims = lambda m, x: range(x.dim() - m.weight.dim())  # Cohere's per-head norm: (H, D)
    return rule


llama_rms_norm_rule = _rms_rule("llama_rms_norm_rule", _llama_x_hat,
                                "HF Llama-style RMSNorm: w · x̂.to(input dtype), fp32 statistics.")
t5_layer_norm_rule = _rms_rule("t5_layer_norm_rule", _t5_x_hat,
                               "HF T5LayerNorm: w · x̂, x̂ cast to w's dtype when w is half.")
gemma_rms_norm_rule = _rms_rule("gemma_rms_norm_rule", _gemma_x_hat,
                                "HF Gemma-style RMSNorm: x̂ · (1 + w) in fp32.")
olmo2_rms_norm_rule = _rms_rule("olmo2_rms_norm_rule", _olmo2_x_hat,
                                "HF OLMo2-style RMSNorm: (w · x̂) in fp32, cast to the input dtype.")
llama4_rms_norm_rule = _rms_rule("llama4_rms_norm_rule", _llama4_x_hat,
                                 "HF Llama4-style RMSNorm: x̂ (fp32) cast to the input dtype, times w.")
gemma3n_rms_norm_rule = _rms_rule("gemma3n_rms_norm_rule", _gemma3n_x_hat,
                                  "HF Gemma3n-style RMSNorm: x̂ · w in fp32 (x̂ through pow(·, -1/2)).")
cohere_layer_norm_rule = _rms_rule("cohere_layer_norm_rule", _cohere_x_hat,
                                   "HF Cohere-style LayerNorm: w · x̂ in fp32, no bias.")


# --------------------------------------------------------------------------- timm norms and scales


def timm_layer_norm2d_rule(module: nn.LayerNorm, x, delta, wanted, backend) -> dict:
    """timm LayerNorm2d: LayerNorm over the channels of (B, C, H, W)."""
    _batched(module, x, 4)
    return _affine(module, _channels_first_x_hat(module, x), delta, False, wanted, backend)


def _channels_first_x_hat(module: nn.LayerNorm, x: Tensor) -> Tensor:
    x_cl = x.to(acc_dtype(x.dtype)).permute(0, 2, 3, 1)
    return F.layer_norm(x_cl, module.normalized_shape, eps=module.eps).permute(0, 3, 1, 2)


def _timm_layer_norm2d_signed(module, x, delta, wanted, backend) -> dict:
    _batched(module, x, 4)
    return _signed_affine(module, _channels_first_x_hat(module, x), delta, False, wanted)


timm_layer_norm2d_rule.signed = _timm_layer_norm2d_signed
timm_layer_norm2d_rule.sample_dims = lambda m, x: (0,)


def _scale_rule(name: str, channels_last: bool, doc: str):
    """Rule for a per-channel scale y = x · γ (channels last, or at dim 1): γ gets Σ_k |Σ_t δ x|."""
    def pieces(module: nn.Module, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        _batched(module, x, 2)
        B, C = x.shape[0], module.gamma.numel()
        if channels_last:
            return delta.reshape(B, -1, C), x.reshape(B, -1, C)
        return delta.reshape(B, C, -1).transpose(1, 2), x.reshape(B, C, -1).transpose(1, 2)

    def rule(module, x, delta, wanted, backend) -> dict:
        if "gamma" not in wanted:
            return {}
        d3, x3 = pieces(module, x, delta)
        return {"gamma": ops.per_sample_abs_sum(d3, x3, backend=backend)}

    def signed(module, x, delta, wanted, backend) -> dict:
        if "gamma" not in wanted:
            return {}
        d3, x3 = pieces(module, x, delta)
        return {"gamma": _signed_sum(d3, x3)}

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = doc
    rule.signed = signed
    rule.sample_dims = (lambda m, x: range(x.dim() - 1)) if channels_last else (lambda m, x: (0,))
    return rule


layer_scale_rule = _scale_rule("layer_scale_rule", True, "timm LayerScale, y = x · γ on channels-last input.")
layer_scale2d_rule = _scale_rule("layer_scale2d_rule", False, "timm LayerScale2d, y = x · γ on (B, C, H, W).")


# --------------------------------------------------------------------------- reasons


def _fast_norm_reason(module: nn.Module) -> Optional[str]:
    # timm's fast_layer_norm (apex or low-precision autocast) is not the maths of the rule
    return "fallback" if module._fast_norm else None


def _in_place_reason(module: nn.Module) -> Optional[str]:
    # x.mul_(γ) overwrites the input the rule needs
    return "fallback" if module.inplace else None


KNOWN: dict[str, KnownForward] = {
    "HF Conv1D": KnownForward(HFConv1D),
    "HF Llama RMSNorm": KnownForward(LlamaRMSNorm),
    "HF T5LayerNorm": KnownForward(T5LayerNorm),
    "HF Gemma RMSNorm": KnownForward(GemmaRMSNorm),
    "HF OLMo2 RMSNorm": KnownForward(Olmo2RMSNorm),
    "HF Helium RMSNorm": KnownForward(HeliumRMSNorm),
    "HF Llama4 RMSNorm": KnownForward(Llama4TextRMSNorm),
    "HF Gemma3n RMSNorm": KnownForward(Gemma3nRMSNorm),
    "HF Cohere LayerNorm": KnownForward(CohereLayerNorm),
    "timm LayerNorm": KnownForward(TimmLayerNorm, nn.LayerNorm),
    "timm LayerNorm2d": KnownForward(TimmLayerNorm2d, nn.LayerNorm),
    "timm LayerScale": KnownForward(TimmLayerScale),
    "timm LayerScale2d": KnownForward(TimmLayerScale2d),
}

# (matcher, rule, reason): the registry entries rules.py appends to its own.
ZOO_RULES: list[tuple[Callable[[nn.Module], bool], Callable, Optional[Callable[[nn.Module], Optional[str]]]]] = [
    (KNOWN["HF Conv1D"], hf_conv1d_rule, None),
    (KNOWN["HF Llama RMSNorm"], llama_rms_norm_rule, None),
    (KNOWN["HF T5LayerNorm"], t5_layer_norm_rule, None),
    (KNOWN["HF Gemma RMSNorm"], gemma_rms_norm_rule, None),
    (KNOWN["HF OLMo2 RMSNorm"], olmo2_rms_norm_rule, None),
    (KNOWN["HF Helium RMSNorm"], olmo2_rms_norm_rule, None),
    (KNOWN["HF Llama4 RMSNorm"], llama4_rms_norm_rule, None),
    (KNOWN["HF Gemma3n RMSNorm"], gemma3n_rms_norm_rule, None),
    (KNOWN["HF Cohere LayerNorm"], cohere_layer_norm_rule, None),
    (KNOWN["timm LayerNorm"], layer_norm_rule, _fast_norm_reason),
    (KNOWN["timm LayerNorm2d"], timm_layer_norm2d_rule, _fast_norm_reason),
    (KNOWN["timm LayerScale"], layer_scale_rule, _in_place_reason),
    (KNOWN["timm LayerScale2d"], layer_scale2d_rule, _in_place_reason),
]
