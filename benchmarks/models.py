"""Named model shapes for the benchmarks, written out here so nothing is downloaded.

Dimensions are those of the public configs (config.json on the Hub) of each model; the benchmarks
build random-weight models from them. "tiny" is the CPU stand-in used when there is no GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set a DPO step's cost."""

    name: str
    model_type: str  # "llama" or "qwen2"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    def config(self):
        """A transformers config (LlamaConfig or Qwen2Config) with these dimensions."""
        common = dict(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=131072, use_cache=False,
        )
        if self.model_type == "qwen2":
            from transformers import Qwen2Config

            return Qwen2Config(**common)
        from transformers import LlamaConfig

        return LlamaConfig(**common)

    def params(self) -> int:
        """Parameter count (embeddings + body + untied head)."""
        d, f, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        kv = d * self.num_key_value_heads // self.num_attention_heads
        body = L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d)
        return V * d * (1 if self.tie_word_embeddings else 2) + body + d


MODELS: Dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, True),
        ModelShape("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128256, True),
        ModelShape("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256, False),
        ModelShape("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, True, rope_theta=1000000.0,
                   rms_norm_eps=1e-6),
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
