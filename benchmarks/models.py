"""Named model shapes for the benchmarks, written out here so nothing is downloaded.

Dimensions are those of the public configs (config.json on the Hub) of each model; the benchmarks
build random-weight models from them. "tiny" is the CPU stand-in used when there is no GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set a DPO step's cost."""

    name: str
    model_type: str  # a key of CONFIG_CLASSES: "llama", "qwen2", "gemma2", "gemma3_text", "phi3"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads (Gemma's is wider)
    extra: Tuple[Tuple[str, Any], ...] = ()  # further config fields (softcapping, sliding window, ...)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def lora_targets(self) -> List[str]:
        """Every linear of a decoder layer (QLoRA on all of them); Phi-3 fuses q/k/v and gate/up."""
        if self.model_type == "phi3":
            return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    @property
    def attention(self) -> str:
        """The attention implementation to train with: SDPA, except Gemma 2 (its score softcapping needs eager)."""
        return "eager" if self.model_type == "gemma2" else "sdpa"

    def config(self):
        """A transformers config of `model_type` with these dimensions (random weights are built from it)."""
        import transformers

        common = dict(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=131072, use_cache=False,
            **({"head_dim": self.head_dim} if self.head_dim else {}), **dict(self.extra),
        )
        return getattr(transformers, CONFIG_CLASSES[self.model_type])(**common)

    def params(self) -> int:
        """Parameter count (embeddings + body + untied head)."""
        d, f, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q = self.head_size * self.num_attention_heads
        kv = self.head_size * self.num_key_value_heads
        body = L * (2 * d * q + 2 * d * kv + 3 * d * f + 2 * d)
        return V * d * (1 if self.tie_word_embeddings else 2) + body + d


#: model_type -> the transformers config class the benchmarks build
CONFIG_CLASSES: Dict[str, str] = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gemma2": "Gemma2Config",
                                  "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config"}


MODELS: Dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, True),
        ModelShape("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128256, True),
        ModelShape("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256, False),
        ModelShape("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, True, rope_theta=1000000.0,
                   rms_norm_eps=1e-6),
        # Gemma 2 9B: final-logit (30) and attention-score (50) softcapping, sliding window on alternate layers
        ModelShape("gemma-2-9b", "gemma2", 3584, 14336, 42, 16, 8, 256000, True, rope_theta=10000.0,
                   rms_norm_eps=1e-6, head_dim=256,
                   extra=(("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
                          ("query_pre_attn_scalar", 256), ("sliding_window", 4096))),
        # Gemma 3 12B, its language model (Gemma3ForCausalLM): q/k norms, 5 local layers per global one
        ModelShape("gemma-3-12b", "gemma3_text", 3840, 15360, 48, 16, 8, 262208, True, rope_theta=1000000.0,
                   rms_norm_eps=1e-6, head_dim=256, extra=(("query_pre_attn_scalar", 256), ("sliding_window", 1024))),
        # Phi-3-mini (4k): fused qkv_proj and gate_up_proj, untied head, 32k vocabulary
        ModelShape("phi-3-mini", "phi3", 3072, 8192, 32, 32, 32, 32064, False, rope_theta=10000.0,
                   extra=(("eos_token_id", 2), ("pad_token_id", 0))),  # ids inside a scaled-down vocabulary
        # CPU stand-in: same structure, tiny dimensions (odd vocabulary on purpose).
        ModelShape("tiny", "llama", 64, 128, 2, 4, 2, 1013, False, rope_theta=10000.0),
    )
}

GPU_MODELS: List[str] = [n for n in MODELS if n != "tiny"]


def get_model(name: str) -> ModelShape:
    if name not in MODELS:
        raise ValueError(f"--shapes: unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (what users train in), fp32 on CPU (tiny shapes, fast and exact)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
