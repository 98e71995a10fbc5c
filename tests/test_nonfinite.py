"""A diverged run (a tiny model at a huge learning rate) stops with "... is not finite at step N" and a hint,
saves nothing non-finite and keeps the last good checkpoint; or skips such steps when told; a collapsed run
(gradient norm exactly 0 step after step) is warned about once."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file

from dpo_fast.errors import UserError
from dpo_fast.train import DPOFastTrainer
from dpo_fast.train.logging import read_metrics
from dpo_fast.train.loop import NonFiniteError, ZeroGradWatch
from test_train import make_cfg  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def logged_steps(output):
    return [r["step"] for r in read_metrics(os.path.join(output, "metrics.jsonl")) if "loss" in r]


def test_huge_lr_stops_at_the_first_non_finite_gradient_keeping_the_last_checkpoint(tok, tmp_path):
    # lr 1e4 without clipping: step 1 (a fresh LoRA) is finite; the weights it makes give a NaN gradient norm at
    # step 2 (31 of 40 seeds tried) or 3 (9 of 40; one other seed: 4): the first updates of size ~lr wreck it.
    cfg = make_cfg(tok, tmp_path, lr=1e4, max_grad_norm=None, max_steps=6, save_steps=1)
    trainer = DPOFastTrainer(cfg, tokenizer=tok, log=lambda s: None)
    with pytest.raises(UserError) as err:
        trainer.train()
    assert isinstance(err.value, NonFiniteError) and isinstance(err.value, FloatingPointError)
    bad = err.value.step
    assert 2 <= bad <= 6 and err.value.what == "gradient norm"
    message = str(err.value)
    assert f"gradient norm is not finite (nan) at step {bad}: the training diverged" in message
    assert "lower --lr (now 10000)" in message and "--max-grad-norm 1.0; it is off" in message
    last = os.path.join(cfg.output, f"checkpoint-{bad - 1}")
    assert f"the last checkpoint, {last}, is kept" in message
    saved = sorted(n for n in os.listdir(cfg.output) if n.startswith("checkpoint-"))
    assert saved == sorted(f"checkpoint-{s}" for s in range(1, bad))
    kept = adapter(last)
    top = adapter(cfg.output)
    assert all_finite(kept) and all(torch.equal(top[k], kept[k]) for k in kept)  # the top level: the last good step
    assert logged_steps(cfg.output) == list(range(1, bad))


def test_non_finite_loss_names_the_step_and_nothing_is_saved(tok, tmp_path):
    cfg = make_cfg(tok, tmp_path, max_steps=5, grad_accum=2, batch_size=4, max_grad_norm=0.5)
    trainer = DPOFastTrainer(cfg, tokenizer=tok, log=lambda s: None).setup()
    calls = {"n": 0}
    real = trainer.loss_fn

    def loss_fn(model, batch):  # the 5th micro-batch (step 3's first) gives NaN
        calls["n"] += 1
        loss, metrics = real(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), metrics

    trainer.loss_fn = loss_fn
    with pytest.raises(NonFiniteError, match=r"^loss is not finite \(nan\) at step 3: .*below 0.5.*no checkpoint"):
        trainer.train()
    assert calls["n"] == 5  # stopped at that micro-batch: no backward of NaN, no further forwards
    assert not [n for n in os.listdir(cfg.output) if n.startswith("checkpoint-")]
    assert not os.path.exists(os.path.join(cfg.output, "adapter_model.safetensors"))
    assert logged_steps(cfg.output) == [1, 2]


def test_weights_that_turned_non_finite_are_never_saved(tok, tmp_path):
    cfg = make_cfg(tok, tmp_path, max_steps=4, save_steps=2)
    trainer = DPOFastTrainer(cfg, tokenizer=tok, log=lambda s: None).setup()
    step, calls = trainer.optimizer.step, {"n": 0}
    lora = next(p for n, p in trainer.model.named_parameters() if p.requires_grad)

    def poisoned_step(*args, **kwargs):  # step 2's update leaves an Inf weight (finite loss and gradients)
        out = step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                lora.view(-1)[0] = float("inf")
        return out

    trainer.optimizer.step = poisoned_step
    with pytest.raises(NonFiniteError, match="weights are not finite after step 2"):
        trainer.train()
    assert not os.path.exists(os.path.join(cfg.output, "checkpoint-2"))
    assert not os.path.exists(os.path.join(cfg.output, "adapter_model.safetensors"))


def test_skip_mode_skips_diverged_steps_and_finishes_with_finite_weights(tok, tmp_path):
    cfg = make_cfg(tok, tmp_path, lr=1e4, max_grad_norm=None, max_steps=8, on_nonfinite="skip")
    logs = []
    trainer = DPOFastTrainer(cfg, tokenizer=tok, log=logs.append)
    before = {n: p.detach().clone() for n, p in trainer.setup().model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert result.steps == 8
    skipped = [r["step"] for r in result.history if r["skipped_update"] == 1.0]
    assert skipped and result.history[0]["skipped_update"] == 0.0  # diverges as when stopping (step 2-4 measured)
    for step in skipped:  # one warning line per skipped step
        assert sum(line.startswith(f"warning: step {step} skipped (no update): gradient norm is not finite")
                   for line in logs) == 1
    assert all_finite(adapter(cfg.output)) and all_finite(adapter(result.checkpoint_dir))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the finite steps did update


def test_collapsed_run_is_warned_once_naming_the_steps(tok, tmp_path):
    cfg = make_cfg(tok, tmp_path, max_steps=9, max_grad_norm=None)
    logs = []
    trainer = DPOFastTrainer(cfg, tokenizer=tok, log=logs.append).setup()
    real = trainer.loss_fn
    calls = {"n": 0}

    def loss_fn(model, batch):  # a collapsed run: from step 3 on every gradient is exactly 0
        calls["n"] += 1
        loss, metrics = real(model, batch)
        return (loss * 0.0 if calls["n"] >= 3 else loss), metrics

    trainer.loss_fn = loss_fn
    result = trainer.train()
    assert [r["grad_norm"] == 0.0 for r in result.history] == [False, False] + [True] * 7
    warned = [line for line in logs if "gradient norm has been exactly 0" in line]
    assert warned == [warned[0]] and "for 5 steps in a row (steps 3-7)" in warned[0] and "lower --lr" in warned[0]


def test_zero_grad_watch_counts_consecutive_zero_steps_only():
    watch = ZeroGradWatch(patience=3)
    norms = [0.0, 0.0, 1.0, 0.0, 0.0, float("nan"), 0.0, 0.0, 0.0, 0.0, 0.0]
    out = [watch.update(step, g) for step, g in enumerate(norms, start=1)]
    assert [i + 1 for i, w in enumerate(out) if w] == [9]
    assert "3 steps in a row (steps 7-9)" in out[8]
    fresh = copy.copy(ZeroGradWatch(patience=1))
    assert fresh.update(4, 0.0) is not None and fresh.update(5, 0.0) is None
