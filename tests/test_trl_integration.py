"""dpo_fast.integrations.trl: an unmodified trl.DPOTrainer trains with dpo_fast's head (CPU, tiny model)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (optional dependency: pip install 'trl>=1,<2')")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import dpo_fast.integrations.trl as dtrl  # noqa: E402
from dpo_fast.patching import is_patched, patch_report  # noqa: E402

WORDS = [f"w{i}" for i in range(120)]
#: fp32 runs with and without enable(), metrics relative to max(1, |value|): over 20 seeds per family (two steps,
#: test_dpo_trainer_on_other_families) the worst was 1.4e-5 (Gemma 2's second gradient norm), 5.4e-6 for Phi-3
TOL_FP32 = 1e-4


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def dataset(n: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))

    def text(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    rows = [{"prompt": text(int(torch.randint(3, 7, (), generator=g))),
             "chosen": " " + text(int(torch.randint(2, 8, (), generator=g))),
             "rejected": " " + text(int(torch.randint(2, 8, (), generator=g)))} for _ in range(n)]
    return Dataset.from_list(rows)


def build(seed_state, tok, data, tmp_path, name, targets=("q_proj", "v_proj"), family=None, **config):
    """A DPOTrainer on a tiny random model: Llama, or `family` (a variant of test_families.family_config)."""
    torch.set_rng_state(seed_state)
    if family is None:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        base = LlamaForCausalLM(cfg)
    else:
        from test_families import family_model

        base = family_model(family, lora=False, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=list(targets), init_lora_weights=False))
    config = {"per_device_train_batch_size": 4, "max_steps": 3, **config}
    args = trl.DPOConfig(output_dir=str(tmp_path / name), learning_rate=1e-2, logging_steps=1, save_strategy="no",
                         report_to=[], use_cpu=True, beta=0.2, seed=0, data_seed=0, dataloader_num_workers=0,
                         disable_tqdm=True, **config)
    return trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


def _same_token_accuracy(plain: dict, fast: dict) -> None:
    """mean_token_accuracy counts argmax hits: on a random tiny model two logits can tie to fp32 rounding,
    and two correct heads may then pick different argmaxes. Allow at most two such flips among the first
    batch's 16-72 completion tokens."""
    a, b = plain["mean_token_accuracy"], fast["mean_token_accuracy"]
    assert 0.0 <= b <= 1.0 and abs(a - b) <= 0.1, (a, b)


def test_dpo_trainer_with_and_without_enable(tmp_path):
    tok, data = tokenizer(), dataset()
    state = torch.get_rng_state()
    dtrl.disable()
    plain = build(state, tok, data, tmp_path, "plain")
    assert not is_patched(plain.model)
    try:
        dtrl.enable(body=False)
        assert dtrl.is_enabled()
        fast = build(state, tok, data, tmp_path, "fast")
    finally:
        dtrl.disable()
    assert is_patched(fast.model) and not dtrl.is_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.train()
        fast.train()
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (plain, fast)]
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "entropy", "logits/chosen", "mean_token_accuracy"):
            assert math.isfinite(a[key]) and math.isfinite(b[key]), key
    first_plain, first_fast = logs[0][0], logs[1][0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected"):
        a, b = first_plain[key], first_fast[key]
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (key, a, b)
    _same_token_accuracy(first_plain, first_fast)
    # training moved the adapter in both runs
    assert logs[1][-1]["rewards/margins"] != logs[1][0]["rewards/margins"]


def test_dpo_trainer_with_prefix_sharing(tmp_path):
    """enable(prefix_sharing=True): TRL's policy and reference calls run each pair as one packed row, and
    the first step's metrics equal those of TRL's own two-row step."""
    tok, data = tokenizer(), dataset()
    state = torch.get_rng_state()
    dtrl.disable()
    plain = build(state, tok, data, tmp_path, "plain")
    try:
        dtrl.enable(body=False, prefix_sharing=True)
        fast = build(state, tok, data, tmp_path, "shared")
    finally:
        dtrl.disable()
    rows = []
    fast.model.get_input_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.train()
        fast.train()
    assert rows and all(r == 4 for r in rows), rows  # 4 pairs per batch -> 4 packed rows, never 8
    first_plain = next(h for h in plain.state.log_history if "loss" in h)
    first_fast = next(h for h in fast.state.log_history if "loss" in h)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "entropy", "logits/chosen"):
        a, b = first_plain[key], first_fast[key]
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (key, a, b)
    _same_token_accuracy(first_plain, first_fast)


def test_enable_rejects_bad_options_and_unsupported_versions(monkeypatch):
    with pytest.raises(TypeError, match="unknown option"):
        dtrl.enable(fused=True)
    monkeypatch.setattr(trl, "__version__", "0.9.6")
    with pytest.raises(RuntimeError, match="0.9.6 is not supported"):
        dtrl.enable()
    assert not dtrl.is_enabled()


def test_unsupported_model_falls_back_to_trl_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    dtrl.enable(body=False)
    try:
        import trl.trainer.dpo_trainer as mod

        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
        with pytest.warns(UserWarning, match="TRL's own fused head"):
            mod.add_fused_lm_head(gpt2, outputs=("log_probs",))
        assert not is_patched(gpt2)
        ids = torch.randint(0, 64, (2, 9))
        out = gpt2(input_ids=ids, labels=ids, fused_lm_head=True)
        assert out.log_probs.shape == (2, 8) and torch.isfinite(out.log_probs).all()
    finally:
        dtrl.disable()



@pytest.mark.parametrize("offload,prefix_sharing", [(False, False), (True, False), (True, True)])
def test_dpo_trainer_with_body_kernels_and_gradient_checkpointing(tmp_path, monkeypatch, offload, prefix_sharing):
    """enable() with the body kernels and TRL's gradient checkpointing on. TRL turns checkpointing off and
    on again around every reference pass, which puts transformers' checkpoint function back on every
    layer; each policy forward still offloads (when asked) and skips down_proj in the recompute, and the
    metrics are TRL's own."""
    from test_checkpointing import _count_parked, _count_tail_skips

    tok, data = tokenizer(), dataset()
    state = torch.get_rng_state()
    options = dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    dtrl.disable()
    plain = build(state, tok, data, tmp_path, "plain", **options)
    try:
        dtrl.enable(offload_checkpointing=offload, prefix_sharing=prefix_sharing)
        fast = build(state, tok, data, tmp_path, "fast", **options)
    finally:
        dtrl.disable()
    parked = _count_parked(monkeypatch)
    skips = _count_tail_skips(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.train()
        fast.train()
    layers = fast.model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    # 3 steps: one down_proj per layer and recompute (and o_proj with offload); with offload, one parked
    # input and one parked mid residual per layer and step
    assert skips[False] == 3 * len(layers) * (2 if offload else 1)
    assert [p[0] == "mid" for p in parked] == [False, True] * (3 * len(layers) if offload else 0)
    rows = [p[1] if p[0] == "mid" else p for p in parked]
    assert all(shape[0] == (4 if prefix_sharing else 8) for shape in rows)  # 4 pairs: packed rows, or 8 rows
    first_plain = next(h for h in plain.state.log_history if "loss" in h)
    first_fast = next(h for h in fast.state.log_history if "loss" in h)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        a, b = first_plain[key], first_fast[key]
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (key, a, b)


@pytest.mark.parametrize("family,targets", [("gemma2", ["q_proj", "v_proj", "up_proj", "down_proj"]),
                                            ("phi3", ["qkv_proj", "gate_up_proj", "down_proj"])])
def test_dpo_trainer_on_other_families(tmp_path, family, targets):
    """Gemma 2 (softcapped logits, tied head, GeGLU, (1 + w) norms) and Phi-3 (fused qkv and gate/up
    projections): with enable() and the body kernels, TRL's metrics and gradient norms of two steps are those
    of TRL's own head.

    In fp32 (bf16=False): TRL's default bf16=True runs the steps under CPU bf16 autocast, where the two runs
    round differently (the fused LoRA linear rounds its output once, peft's three times) and their Phi-3
    log-probs differed by 0.1-0.3%, as far as each is from a float64 model;
    test_families.test_bf16_autocast_error_is_that_of_the_unpatched_model bounds that error."""
    tok, data = tokenizer(), dataset(4)
    state = torch.get_rng_state()
    options = dict(targets=targets, family=family, max_steps=2, per_device_train_batch_size=2, bf16=False)
    dtrl.disable()
    plain = build(state, tok, data, tmp_path, "plain", **options)
    try:
        dtrl.enable()
        fast = build(state, tok, data, tmp_path, "fast", **options)
    finally:
        dtrl.disable()
    assert is_patched(fast.model) and not is_patched(plain.model)
    counts = patch_report(fast.model).counts
    assert counts["qlora_linear"] == 2 * len(targets) and counts["swiglu"] == 2, counts  # 2 layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.train()
        fast.train()
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (plain, fast)]
    assert len(logs[0]) == len(logs[1]) == 2
    for step, (a_log, b_log) in enumerate(zip(*logs)):
        keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "entropy", "logits/chosen", "logits/rejected", "grad_norm"]
        for key in keys:
            a, b = a_log[key], b_log[key]
            assert abs(a - b) <= TOL_FP32 * max(1.0, abs(a)), (step, key, a, b)
        _same_token_accuracy(a_log, b_log)
    assert logs[1][1]["rewards/margins"] != 0.0  # the second step sees the first one's update
