"""Test helpers: a tiny checkpoint, a Hugging Face cache laid out as after a download, and offline mode.

`offline_hub` points huggingface_hub (and datasets) at a temporary HF_HOME with HF_HUB_OFFLINE on. Setting the
environment variables alone is not enough inside a running process: huggingface_hub reads HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE into `huggingface_hub.constants` when it is imported (datasets into
`datasets.config`), and transformers / peft / datasets read those module attributes at call time, so the
attributes are patched too.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from dpo_fast.demo_task import VOCAB_FILE, demo_tokenizer, read_vocab, tiny_llama_config

#: words of the hand-written schema rows that the demo vocabulary lacks
EXTRA_WORDS = ("Human:", "Assistant:")


def tiny_tokenizer(directory: Path):
    """The demo word-level tokenizer (chat template included) with the HH-RLHF turn words added."""
    vocab = Path(directory) / "vocab.txt"
    vocab.write_text("\n".join(read_vocab(VOCAB_FILE) + list(EXTRA_WORDS)) + "\n", encoding="utf-8")
    return demo_tokenizer(vocab)


def save_tiny_checkpoint(path: Path, tok, *, layers: int = 2, seed: int = 0) -> str:
    """A random tiny Llama and `tok` saved with save_pretrained, as a downloaded checkpoint holds them."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok), hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=layers, num_attention_heads=2,
                                                               num_key_value_heads=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def put_in_hub_cache(cache: Path, repo_id: str, source: Path, commit: str, *, ref: str = "main",
                     repo_type: str = "model") -> Path:
    """Copy `source`'s files into the cache as `repo_id` at `commit` (snapshots/<commit>/..., refs/<ref>)."""
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def offline_hub(monkeypatch, home: Path) -> Path:
    """HF_HOME=`home`, HF_HUB_OFFLINE=1 for this test (environment and the libraries' constants); the hub cache."""
    import datasets
    from huggingface_hub import constants

    cache = Path(home) / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(home) / "datasets")
    return cache


def datasets_cache_in(monkeypatch, directory: Path) -> None:
    """Keep the arrow files `datasets.load_dataset` writes for a local folder inside the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(directory))
    os.makedirs(directory, exist_ok=True)
