"""The library-layer rules (HF Conv1D and RMSNorms, timm norms and layer scales) against a
float64 torch.func per-sample oracle of the module alone, their signed twins against autograd,
and recognition by code: a lookalike or a subclass with another forward is never matched."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from mas_fast.importance import rules, zoo_rules
from mas_fast.importance.rules import rule_for
from tolerances import assert_close, assert_close_lowp

transformers = pytest.importorskip("transformers")
timm_layers = pytest.importorskip("timm.layers")
from transformers.models.cohere.modeling_cohere import CohereLayerNorm  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm  # noqa: E402
from transformers.models.helium.modeling_helium import HeliumRMSNorm  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _randomised(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


# name → (module factory, input shapes (samples first), expected rule)
CASES = {
    "hf-conv1d": (lambda: Conv1D(6, 5), [(4, 5), (3, 7, 5), (2, 3, 4, 5)], zoo_rules.hf_conv1d_rule),
    "llama-rmsnorm": (lambda: LlamaRMSNorm(8, eps=1e-5), [(4, 8), (3, 6, 8)], zoo_rules.llama_rms_norm_rule),
    "t5-layernorm": (lambda: T5LayerNorm(8), [(4, 8), (3, 6, 8)], zoo_rules.t5_layer_norm_rule),
    "gemma-rmsnorm": (lambda: GemmaRMSNorm(8), [(4, 8), (3, 6, 8)], zoo_rules.gemma_rms_norm_rule),
    "olmo2-rmsnorm": (lambda: Olmo2RMSNorm(8), [(4, 8), (3, 6, 8)], zoo_rules.olmo2_rms_norm_rule),
    "helium-rmsnorm": (lambda: HeliumRMSNorm(8), [(3, 6, 8)], zoo_rules.olmo2_rms_norm_rule),
    "llama4-rmsnorm": (lambda: Llama4TextRMSNorm(8), [(4, 8), (3, 6, 8)], zoo_rules.llama4_rms_norm_rule),
    "gemma3n-rmsnorm": (lambda: Gemma3nRMSNorm(8), [(4, 8), (3, 6, 8)], zoo_rules.gemma3n_rms_norm_rule),
    "cohere-layernorm": (lambda: CohereLayerNorm(8), [(4, 8), (3, 6, 8)], zoo_rules.cohere_layer_norm_rule),
    "cohere-qk-norm": (lambda: CohereLayerNorm((3, 8)), [(2, 5, 3, 8)], zoo_rules.cohere_layer_norm_rule),
    "timm-layernorm": (lambda: timm_layers.LayerNorm(8), [(4, 8), (3, 6, 8)], rules.layer_norm_rule),
    "timm-layernorm2d": (lambda: timm_layers.LayerNorm2d(6), [(3, 6, 4, 5), (2, 6, 1, 7)],
                         zoo_rules.timm_layer_norm2d_rule),
    "timm-layerscale": (lambda: timm_layers.LayerScale(8), [(4, 8), (3, 5, 8)], zoo_rules.layer_scale_rule),
    "timm-layerscale2d": (lambda: timm_layers.LayerScale2d(6), [(3, 6, 4, 5)], zoo_rules.layer_scale2d_rule),
}
# Modules that compute in fp32 whatever the input dtype (Gemma: x.float() and (1 + w.float())):
# float64 inputs are checked with float32's tolerance.
FP32_INSIDE = {"gemma-rmsnorm", "gemma3n-rmsnorm", "olmo2-rmsnorm", "helium-rmsnorm", "cohere-layernorm",
               "cohere-qk-norm"}
SIGNED = [c for c in CASES if CASES[c][2] is not rules.layer_norm_rule]  # timm LayerNorm reuses torch's rule
SHAPED = [pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
          for name, (_, shapes, _) in CASES.items() for shape in shapes]


def module_oracle(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> tuple[dict, dict]:
    """(Σ_k |g_k|, Σ_k g_k) with g_k = ∂<module(x_k), δ_k>/∂θ, by torch.func over the module alone."""
    params = {n: p.detach() for n, p in module.named_parameters()}

    def inner(p, xk, dk):
        return (functional_call(module, p, (xk.unsqueeze(0),)) * dk.unsqueeze(0)).sum()

    g = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, delta)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ({n: v.to(acc).abs().sum(0) for n, v in g.items()}, {n: v.to(acc).sum(0) for n, v in g.items()})


def setup(name: str, shape, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    build, _, rule = CASES[name]
    module = _randomised(build()).to(dtype).eval()
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        delta = torch.randn_like(module(x))
    return module, x, delta, rule


def run_rule(rule, module, x, delta, signed=False):
    fn = rule.signed if signed else rule
    return fn(module, x, delta, frozenset(n for n, _ in module.named_parameters()), "reference")


@pytest.mark.parametrize("name,shape", SHAPED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rule_matches_per_sample_oracle(name, shape, dtype):
    module, x, delta, rule = setup(name, shape, dtype)
    assert rule_for(module) is rule
    got = run_rule(rule, module, x, delta)
    want, _ = module_oracle(module.double(), x.double(), delta.double())
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(got[n], want[n], torch.float32 if name in FP32_INSIDE else dtype, f"{name} {n}")


@pytest.mark.parametrize("name", list(CASES))
def test_rule_bf16_within_twice_pytorch_error(name):
    """bf16 module and inputs: the rule's error against fp64 is at most 2× torch.func's in bf16."""
    module, x, delta, rule = setup(name, CASES[name][1][-1], torch.bfloat16)
    got = run_rule(rule, module, x, delta)
    same_dtype, _ = module_oracle(module, x, delta)
    want, _ = module_oracle(module.double(), x.double(), delta.double())
    for n in want:
        assert got[n].dtype == torch.float32
        assert_close_lowp(got[n], want[n], same_dtype[n], f"{name} {n}")


@pytest.mark.parametrize("name", SIGNED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_signed_twin_is_the_batch_gradient(name, dtype):
    module, x, delta, rule = setup(name, CASES[name][1][-1], dtype, seed=1)
    params = dict(module.named_parameters())
    want = torch.autograd.grad((module(x) * delta).sum(), list(params.values()))
    got = run_rule(rule, module, x, delta, signed=True)
    for n, w in zip(params, want):
        assert_close(got[n], w.to(got[n].dtype), torch.float32 if name in FP32_INSIDE else dtype, f"{name} {n}")


def test_rules_declare_sample_dims():
    for name, (build, shapes, rule) in CASES.items():
        dims = list(rule.sample_dims(build(), torch.zeros(shapes[-1])))
        assert 0 in dims, name


# --------------------------------------------------------------------------- recognition

HF_TWINS = {  # "Copied from" classes in other model files: the same code, the same rule
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm": zoo_rules.llama_rms_norm_rule,
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm": zoo_rules.llama_rms_norm_rule,
    "transformers.models.longt5.modeling_longt5.LongT5LayerNorm": zoo_rules.t5_layer_norm_rule,
    "transformers.models.gpt_oss.modeling_gpt_oss.GptOssRMSNorm": zoo_rules.olmo2_rms_norm_rule,
    "transformers.models.gemma4.modeling_gemma4.Gemma4RMSNorm": zoo_rules.gemma3n_rms_norm_rule,
}


@pytest.mark.parametrize("path", list(HF_TWINS))
def test_copied_implementations_are_recognised(path):
    import importlib

    module_name, cls_name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert rule_for(cls(8)) is HF_TWINS[path]


@pytest.mark.parametrize("name", list(CASES))
def test_subclass_with_another_forward_is_not_matched(name):
    base = type(CASES[name][0]())

    class Doubled(base):
        def forward(self, x):
            return 2 * super().forward(x)

    class Same(base):  # keeps the library's forward: still the library's maths
        pass

    module = CASES[name][0]()
    module.__class__ = Doubled
    assert rule_for(module) is None
    module.__class__ = Same
    assert rule_for(module) is CASES[name][2]
    module.__class__ = base
    module.forward = lambda x: 2 * base.forward(module, x)  # an instance-level override
    assert rule_for(module) is None


def test_lookalike_with_the_same_name_is_not_matched():
    class LlamaRMSNorm(nn.Module):  # same name and attributes, eps outside the square root
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance) + self.variance_epsilon
            return self.weight * hidden_states.to(input_dtype)

    assert rule_for(LlamaRMSNorm(8)) is None


def test_renamed_locals_and_docstring_still_match():
    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.variance_epsilon = 1e-6

        def forward(self, h):
            """Same computation, other local names."""
            dt = h.dtype
            h = h.to(torch.float32)
            v = h.pow(2).mean(-1, keepdim=True)
            h = h * torch.rsqrt(v + self.variance_epsilon)
            return self.weight * h.to(dt)

    assert rule_for(Renamed()) is zoo_rules.llama_rms_norm_rule


def test_timm_fast_norm_and_in_place_scale_go_to_the_fallback():
    norm = timm_layers.LayerNorm(8)
    norm._fast_norm = True
    assert rule_for(norm) is None
    assert rule_for(timm_layers.LayerScale(8, inplace=True)) is None
    assert rule_for(timm_layers.LayerScale2d(8, inplace=True)) is None


def test_known_forward_references_match_the_installed_libraries():
    """The reference copies are current: each matches the class it was copied from."""
    pairs = {"HF Conv1D": Conv1D(3, 2), "HF Llama RMSNorm": LlamaRMSNorm(4), "HF T5LayerNorm": T5LayerNorm(4),
             "HF Gemma RMSNorm": GemmaRMSNorm(4), "HF OLMo2 RMSNorm": Olmo2RMSNorm(4),
             "HF Helium RMSNorm": HeliumRMSNorm(4), "HF Llama4 RMSNorm": Llama4TextRMSNorm(4),
             "HF Gemma3n RMSNorm": Gemma3nRMSNorm(4), "HF Cohere LayerNorm": CohereLayerNorm(4),
             "timm LayerNorm": timm_layers.LayerNorm(4),
             "timm LayerNorm2d": timm_layers.LayerNorm2d(4), "timm LayerScale": timm_layers.LayerScale(4),
             "timm LayerScale2d": timm_layers.LayerScale2d(4)}
    assert set(pairs) == set(zoo_rules.KNOWN)
    for key, module in pairs.items():
        assert zoo_rules.KNOWN[key](module), key
        others = [k for k in zoo_rules.KNOWN if k != key and zoo_rules.KNOWN[k](module)]
        assert not others, f"{key} also matches {others}"


def test_forward_reassigned_on_the_class_is_checked_again(monkeypatch):
    class Norm(LlamaRMSNorm):
        pass

    assert rule_for(Norm(4)) is zoo_rules.llama_rms_norm_rule  # verdict cached for this forward
    monkeypatch.setattr(Norm, "forward", lambda self, x: 2 * LlamaRMSNorm.forward(self, x))
    assert rule_for(Norm(4)) is None
