"""`dpo-fast demo` pieces: on-policy pairs, the table, and a miniature end-to-end run."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch

import dpo_fast.demo as demo
from dpo_fast.demo_task import demo_tokenizer, judge, make_preference_dataset
from dpo_fast.train.logging import plot_points, read_metrics


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


def test_miniature_demo_runs_and_reports(tmp_path, capsys, monkeypatch):
    import dpo_fast.train.trainer as trainer_module

    titles = []
    real_plot = trainer_module.plot_metrics

    def plot_and_record(records, path, title="dpo_fast"):
        titles.append(title)
        return real_plot(records, path, title=title)

    monkeypatch.setattr(trainer_module, "plot_metrics", plot_and_record)
    s = replace(demo.DemoSettings(), output=str(tmp_path), n_sft=64, n_dpo=48, n_prompts=12, sft_steps=4,
                dpo_steps=3, sft_batch=8, dpo_batch=8, progress=False, threads=1,
                model_overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
    result = demo.run_demo(s, command="dpo-fast demo --example")
    printed = capsys.readouterr().out
    assert "after SFT" in printed and "after DPO (sigmoid,sft)" in printed and "DPO moved" in printed
    assert "after DPO (sigmoid)" in printed  # the plain-DPO column from the same SFT checkpoint
    for side in (result["before"], result["after"], result["compare"]["after"]):
        assert set(side) == {"reward_accuracy", "logp_accuracy", "win_rate"}
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in side.values())
    assert os.path.isfile(result["plot"]) and os.path.isfile(result["compare"]["plot"])
    assert len(result["dpo"].history) == 3 and len(result["compare"]["dpo"].history) == 3
    assert result["compare"]["loss_type"] == ["sigmoid"]
    # generation prompts are distinct and never a training prompt
    train = {r["prompt"] for r in make_preference_dataset(s.n_sft, seed=s.seed)}
    assert len(result["prompts"]) == s.n_prompts == len(set(result["prompts"]))
    assert not train & set(result["prompts"])
    # the numbers it printed are in OUTPUT/summary.json, with what was run
    with open(os.path.join(str(tmp_path), "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    assert result["summary"] == os.path.join(str(tmp_path), "summary.json") and result["summary"] in printed
    assert summary["command"] == "dpo-fast demo --example" and summary["seed"] == s.seed
    assert summary["settings"]["dpo_steps"] == 3 and summary["after_sft"] == result["before"]
    assert [r["loss_type"] for r in summary["dpo_runs"]] == [["sigmoid", "sft"], ["sigmoid"]]
    assert summary["dpo_runs"][0]["after_dpo"] == result["after"]
    assert summary["dpo_runs"][1]["after_dpo"] == result["compare"]["after"]
    assert summary["dpo_runs"][0]["eval_metrics"] == result["dpo"].eval_metrics
    for run in summary["dpo_runs"]:
        assert run["change"] == {k: run["after_dpo"][k] - summary["after_sft"][k] for k in summary["after_sft"]}
    assert "\n".join(summary["table"]) in printed and summary["date"].startswith("20")
    # held-out evaluations during each DPO run, not only at step 0 and the end; plots titled by their loss
    for run in (result["dpo"], result["compare"]["dpo"]):
        records = read_metrics(run.metrics_path)
        assert [r["step"] for r in records if "eval_loss" in r] == [0, 1, 2, 3]
        step0 = records[0]  # policy == reference: every pair ties; TRL's accuracy reads 0.0, the plot shows chance
        assert step0["step"] == 0 and step0["eval_rewards/accuracies"] == 0.0
        assert plot_points(records, "eval_rewards/accuracies")[0] == (0, 0.5)
    assert titles == ["dpo_fast sft", "dpo_fast dpo: sigmoid + sft (RPO: DPO + NLL of the chosen), beta 0.1",
                      "dpo_fast dpo: sigmoid (plain DPO), beta 0.1"]


def test_demo_command_names_the_options_that_differ():
    assert demo.demo_command(demo.DemoSettings()) == "dpo-fast demo"
    s = replace(demo.DemoSettings(), seed=3, compare_loss_type=[], dpo_lora=True, n_prompts=20)
    assert demo.demo_command(s) == ("dpo-fast demo --seed 3 --compare-loss-type none --lora  "
                                    "(and settings with no command-line option: n_prompts)")


def test_demo_without_compare_run_has_one_column(tmp_path, capsys):
    s = replace(demo.DemoSettings(), output=str(tmp_path), n_sft=32, n_dpo=24, n_prompts=6, sft_steps=2,
                dpo_steps=2, sft_batch=8, dpo_batch=8, progress=False, threads=1, compare_loss_type=[],
                loss_type=["sigmoid"], model_overrides=dict(hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=1, num_attention_heads=2,
                                                            num_key_value_heads=2))
    result = demo.run_demo(s)
    printed = capsys.readouterr().out
    assert result["compare"] is None and "after DPO (sigmoid)" in printed and "sigmoid,sft" not in printed


def test_fresh_rows_avoid_excluded_and_repeated_prompts():
    seed = int(torch.randint(0, 10_000, ()))
    exclude = [r["prompt"] for r in make_preference_dataset(300, seed=seed)]
    rows = demo.fresh_rows(250, seed + 1, exclude=exclude)
    prompts = [r["prompt"] for r in rows]
    assert len(rows) == 250 and len(set(prompts)) == 250 and not set(prompts) & set(exclude)
    assert all(judge(r["prompt"], r["chosen"]) and not judge(r["prompt"], r["rejected"]) for r in rows)
    assert demo.fresh_rows(250, seed + 1, exclude=exclude) == rows  # deterministic
    with pytest.raises(ValueError, match="n"):
        demo.fresh_rows(-1, seed)


def test_format_table_columns_share_the_sft_baseline():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    keys = ("reward_accuracy", "logp_accuracy", "win_rate")
    before, a1, a2 = ({k: float(torch.rand((), generator=g)) for k in keys} for _ in range(3))
    table = demo.format_table(before, a1, {}, n_pairs=5, n_prompts=7,
                              columns=[("after DPO (x)", a1, {"eval_rewards/margins": 0.25}),
                                       ("after DPO (y)", a2, {})])
    lines = table.splitlines()
    assert "after DPO (x)" in lines[0] and "after DPO (y)" in lines[0]
    for line, key in zip(lines[1:4], keys):
        nums = [float(t) for t in line.split()[-5:]]
        assert nums[0] == pytest.approx(before[key], abs=1e-3)
        assert nums[1] == pytest.approx(a1[key], abs=1e-3) and nums[3] == pytest.approx(a2[key], abs=1e-3)
        assert nums[2] == pytest.approx(a1[key] - before[key], abs=2e-3)
        assert nums[4] == pytest.approx(a2[key] - before[key], abs=2e-3)
    assert "0.250" in table and table.count("DPO moved") == 2


def test_cli_options_map_onto_settings():
    import argparse

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    s = demo.settings_from_args(parser.parse_args([]))
    assert s.loss_type == ["sigmoid", "sft"] and s.compare_loss_type == ["sigmoid"]
    s = demo.settings_from_args(parser.parse_args(["--loss-type", "sigmoid", "--compare-loss-type", "none"]))
    assert s.loss_type == ["sigmoid"] and s.compare_loss_type == []
