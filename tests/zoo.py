"""The model zoo of the tests and benchmarks: small configurations of real library models
(Hugging Face transformers + PEFT, timm, torchvision, torch), random init, no downloads.

`ZOO[name]` is a `ZooModel`; `build()` returns the model in eval mode and `inputs(B, T)` a batch
(token ids for language models, images for vision models, embeddings for
nn.TransformerEncoder). `output_fn` maps the model's output to F (the logits, or BERT's last
hidden state). Importable from benchmarks (sys.path holds tests/ there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

VOCAB = 256
IMAGE = 32


@dataclass(frozen=True)
class ZooModel:
    build: Callable[[], nn.Module]
    kind: str                                   # "tokens" | "image" | "embeddings"
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None
    layers: str = ""                            # the parameterised layer types it uses (docs/models.md)

    def inputs(self, batch: int, seq: int = 16, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.kind == "tokens":
            return torch.randint(0, VOCAB, (batch, seq), generator=generator)
        if self.kind == "image":
            return torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
        return torch.randn(batch, seq, 128, generator=generator)


def logits(out: Any) -> torch.Tensor:
    return out.logits


def last_hidden_state(out: Any) -> torch.Tensor:
    return out.last_hidden_state


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config)  # lm_head tied to wte, as in GPT-2


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, attn_implementation="eager")
    return BertModel(config, add_pooling_layer=False)


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       attn_implementation="eager")


def llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_llama_config())


def llama_lora() -> nn.Module:
    """Llama with a PEFT LoRA adapter on the attention projections: only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              lora_dropout=0.0))


def vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=4,
                             depth=2, num_classes=10, init_values=1e-5)  # init_values: LayerScale


def convnext() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=10, depths=(1, 1, 2, 1))


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as build

    return build(num_classes=10)


def mobilenet_v3() -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(num_classes=10)


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


ZOO: dict[str, ZooModel] = {
    "gpt2": ZooModel(gpt2, "tokens", logits, "Embedding (wte tied to lm_head, wpe), HF Conv1D, LayerNorm"),
    "bert": ZooModel(bert, "tokens", last_hidden_state, "Embedding (word, position, token type), Linear, LayerNorm"),
    "llama": ZooModel(llama, "tokens", logits, "Embedding, Linear, HF LlamaRMSNorm"),
    "llama-lora": ZooModel(llama_lora, "tokens", logits, "PEFT LoRA Linear (adapter only trainable)"),
    "vit": ZooModel(vit, "image", None, "Conv2d patch embed, cls_token/pos_embed, Linear, timm LayerNorm, "
                                        "timm LayerScale"),
    "convnext": ZooModel(convnext, "image", None, "Conv2d (depthwise), timm LayerNorm2d / LayerNorm, Linear, "
                                                  "block-held layer scale γ"),
    "resnet18": ZooModel(resnet18, "image", None, "Conv2d, BatchNorm2d, Linear"),
    "mobilenet_v3": ZooModel(mobilenet_v3, "image", None, "Conv2d (depthwise, squeeze-excite), BatchNorm2d, "
                                                          "Linear"),
    "transformer_encoder": ZooModel(transformer_encoder, "embeddings", None,
                                    "nn.MultiheadAttention, Linear, LayerNorm"),
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The zoo model `name`, seeded random init, eval mode, in `dtype`.

    Parameters the libraries initialise to a constant (norm scales and shifts, biases, layer
    scales, LoRA's B) get a small random perturbation: otherwise symmetry zeroes gradients
    (a final LayerNorm with γ = 1, β = 0 makes ‖F‖² constant) and the tests compare zeros.
    """
    torch.manual_seed(seed)
    model = ZOO[name].build()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn_like(p), alpha=0.1 * max(p.abs().max().item(), 0.1))
    return model.to(dtype).eval()


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
