"""`dpo-fast demo` pieces: on-policy pairs, the table, and a miniature end-to-end run."""
from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

import dpo_fast.demo as demo
from dpo_fast.demo_task import demo_tokenizer, judge, make_preference_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_on_policy_pairs_use_the_models_wrong_answers_only(monkeypatch):
    rows = make_preference_dataset(30, seed=int(torch.randint(0, 1000, ())))
    answers = []
    for i, r in enumerate(rows):
        if i % 3 == 0:
            answers.append(r["chosen"].strip())  # right: keep the dataset's near miss
        elif i % 3 == 1:
            answers.append("")  # silent: keep the near miss
        else:
            answers.append("0 0 0 0 0 0 0")  # wrong: becomes the rejected completion
    monkeypatch.setattr(demo, "greedy_completions", lambda *a, **k: answers)
    out, n = demo.on_policy_pairs(None, None, rows)
    assert n == sum(1 for i, r in enumerate(rows) if i % 3 == 2 and not judge(r["prompt"], answers[i]))
    for i, (a, b) in enumerate(zip(rows, out)):
        assert b["chosen"] == a["chosen"] and b["prompt"] == a["prompt"]
        assert b["rejected"] == (" 0 0 0 0 0 0 0" if i % 3 == 2 else a["rejected"])
        assert not judge(b["prompt"], b["rejected"])


def test_greedy_completions_match_a_token_by_token_argmax_loop():
    from transformers import AutoModelForCausalLM

    from dpo_fast.demo_task import tiny_llama_config

    tok = demo_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok), hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=1, num_attention_heads=2,
                                                               num_key_value_heads=2)).eval()
    prompts = [r["prompt"] for r in make_preference_dataset(7, seed=3)]
    got = demo.greedy_completions(model, tok, prompts, max_new_tokens=5, batch_size=2)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt)["input_ids"]
        new = []
        for _ in range(5):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        assert text == tok.decode(new, skip_special_tokens=True)


def test_miniature_demo_runs_and_reports(tmp_path, capsys):
    s = replace(demo.DemoSettings(), output=str(tmp_path), n_sft=64, n_dpo=48, n_prompts=12, sft_steps=4,
                dpo_steps=3, sft_batch=8, dpo_batch=8, progress=False, threads=1,
                model_overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
    result = demo.run_demo(s)
    printed = capsys.readouterr().out
    assert "after SFT" in printed and "after DPO" in printed and "DPO moved" in printed
    for side in ("before", "after"):
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in result[side].values())
    assert os.path.isfile(result["plot"])
    assert len(result["dpo"].history) == 3
