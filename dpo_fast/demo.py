"""`dpo-fast demo`: SFT then DPO of a tiny random-init Llama on a generated rule task, on the CPU.

Nothing is downloaded. The tokenizer and the task come from dpo_fast.demo_task: prompts such as
"sort: 3 1 2 =" whose chosen completion follows the rule and whose rejected one is a near miss.
The demo (1) trains the tiny model from scratch with SFT on chosen completions, (2) runs DPO with
the SFT model as the reference, and (3) prints a before/after table on held-out data (pairs and
prompts disjoint from every training prompt): the DPO implicit-reward accuracy, the log-prob
preference accuracy (does the policy give the chosen completion the higher log-prob?) and the win
rate of greedy generations judged by the rule.

The DPO pairs are on-policy where possible: the rejected completion is the SFT model's own greedy
answer when it breaks the rule (a generated near miss otherwise), and the default loss is DPO plus
the NLL of the chosen completion (RPO, TRL's loss_type=["sigmoid", "sft"]). So that nobody credits
RPO's gain to DPO alone, the demo also runs plain sigmoid DPO from the same SFT checkpoint on the
same pairs and prints it as a second column (`compare_loss_type`).

Every run writes its numbers to OUTPUT/summary.json (the command, the seed, the settings, the
before/after table and each DPO run's held-out metrics), so that numbers quoted about the demo can
be traced to the run that produced them. What the runs show on this task: RPO raises the greedy win
rate; plain sigmoid DPO raises the held-out reward accuracy and the log-prob preference accuracy
too, but lowers the greedy win rate. The greedy answers show why: plain DPO lowers the chosen
log-probs as well, and this sub-million-parameter model then stops ending its answers (it repeats
an item) or drops items. Changing plain DPO's learning rate, beta, steps, batch size, LoRA versus a
full fine-tune, or the pairs kept did not change that.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

import torch


@dataclass
class DemoSettings:
    """Sizes and hyper-parameters of the demo (tuned to run in a few minutes on 1 CPU thread)."""

    seed: int = 0
    output: str = "dpo_fast_demo"
    n_sft: int = 2000  # SFT pairs (only the chosen completion is trained on)
    n_dpo: int = 1200  # DPO pairs, of which eval_fraction are held out
    n_prompts: int = 200  # held-out prompts for greedy generation
    eval_fraction: float = 0.15
    sft_steps: int = 600
    sft_lr: float = 3e-3
    sft_batch: int = 16
    dpo_steps: int = 300
    dpo_evals: int = 6  # held-out evaluations during each DPO run, besides step 0 and the end (for the plot)
    dpo_lr: float = 5e-4
    dpo_batch: int = 16
    beta: float = 0.1
    # DPO + NLL of the chosen completion (TRL's loss_type=["sigmoid", "sft"], the RPO recipe): measured on
    # this task, pure sigmoid DPO lowers the greedy win rate of a model this small (it pushes the model's own
    # errors down and falls into other errors), while the NLL term keeps the chosen answers likely.
    loss_type: List[str] = field(default_factory=lambda: ["sigmoid", "sft"])
    # a second DPO run from the same SFT checkpoint on the same pairs, shown as its own column: plain sigmoid
    # DPO, so the table separates what DPO does from what RPO's NLL term does. Empty: skip it.
    compare_loss_type: List[str] = field(default_factory=lambda: ["sigmoid"])
    dpo_lora: bool = False  # full fine-tune: LoRA on a 0.8M random-init model moves it too little
    lora_r: int = 16
    max_new_tokens: int = 10
    on_policy: bool = True  # rejected = the SFT model's own wrong greedy answer where it errs
    threads: Optional[int] = 1  # torch threads: tiny matmuls gain nothing from more and suffer on a busy box
    progress: bool = True
    model_overrides: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ measuring
@torch.no_grad()
def greedy_completions(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *,
                       max_new_tokens: int = 10, batch_size: int = 64) -> List[str]:
    """Greedy completions of each prompt (prompts of equal token length are batched, no padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    out: List[Optional[str]] = [None] * len(prompts)
    by_len: Dict[int, List[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    try:
        for _, idx in sorted(by_len.items()):
            for start in range(0, len(idx), batch_size):
                part = idx[start:start + batch_size]
                ids = torch.tensor([encoded[i] for i in part], device=device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True)
                for row, i in zip(gen[:, ids.shape[1]:].tolist(), part):
                    if tokenizer.eos_token_id in row:
                        row = row[: row.index(tokenizer.eos_token_id)]
                    out[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [o or "" for o in out]


def win_rate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 10) -> float:
    """Fraction of prompts whose greedy completion follows the rule (dpo_fast.demo_task.judge)."""
    from dpo_fast.demo_task import judge

    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return sum(judge(p, c) for p, c in zip(prompts, completions)) / max(1, len(prompts))


@torch.no_grad()
def logp_preference_accuracy(model: torch.nn.Module, examples: Sequence[Dict[str, Any]], collate: Any,
                             batch_size: int = 64) -> float:
    """Fraction of pairs whose chosen completion gets a higher log-prob than the rejected one."""
    from dpo_fast.forward import sequence_logps

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate([{k: v for k, v in e.items() if not k.startswith("ref_")}
                             for e in examples[start:start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            chosen, rejected = sequence_logps(model, batch)
            wins += int((chosen > rejected).sum())
    finally:
        model.train(was_training)
    return wins / max(1, len(examples))


def on_policy_pairs(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Dict[str, str]], *,
                    max_new_tokens: int = 10) -> tuple:
    """Rows whose rejected completion is the model's own greedy answer wherever that breaks the rule.

    Where the model answers correctly (or says nothing), the generated near miss stays. This is how
    preference data is usually built for DPO: the rejected side is what the policy actually does.
    Returns (rows, number of rows with a model-generated rejected completion).
    """
    from dpo_fast.demo_task import judge

    completions = greedy_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)
    out, n_model = [], 0
    for row, completion in zip(rows, completions):
        row = dict(row)
        if completion.strip() and not judge(row["prompt"], completion):
            row["rejected"] = " " + " ".join(completion.split())
            n_model += 1
        out.append(row)
    return out, n_model


# ------------------------------------------------------------------------------------ the demo
SUMMARY_FILE = "summary.json"


def run_demo(settings: Optional[DemoSettings] = None, *, log=print, command: Optional[str] = None) -> Dict[str, Any]:
    """Run SFT then DPO; print and return the before/after numbers, and write them to OUTPUT/summary.json.

    `command`: the command line that started the demo, recorded in the summary (default: the
    `dpo-fast demo` command equivalent to `settings`, where it has one).
    """
    from dpo_fast.demo_task import demo_tokenizer, make_preference_dataset, tiny_llama_config
    from dpo_fast.train import DPOFastTrainer, TrainConfig

    s = settings or DemoSettings()
    threads = s.threads or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        tokenizer = demo_tokenizer()
        config = tiny_llama_config(len(tokenizer), **s.model_overrides)
        sft_rows = make_preference_dataset(s.n_sft, seed=s.seed)
        # DPO pairs (train and held-out split) and generation prompts: distinct prompts, none seen in training
        dpo_rows = fresh_rows(s.n_dpo, s.seed + 10_000, exclude=[r["prompt"] for r in sft_rows])
        prompts = [r["prompt"] for r in fresh_rows(s.n_prompts, s.seed + 20_000,
                                                   exclude=[r["prompt"] for r in sft_rows + dpo_rows])]
        n_params = sum(p.numel() for p in _count_model(config))
        log(f"dpo-fast demo: tiny Llama ({n_params / 1e6:.2f}M parameters, random init), "
            f"vocab {len(tokenizer)}, task: sort digits / reverse letters; {threads} CPU thread(s)")

        # 1) SFT from scratch on the chosen completions (full fine-tune: the model starts random)
        log(f"\n[SFT] {s.sft_steps} steps on {s.n_sft} chosen completions")
        sft_cfg = TrainConfig(model=config, data=sft_rows, output=os.path.join(s.output, "sft"), stage="sft",
                              use_lora=False, lr=s.sft_lr, batch_size=s.sft_batch, max_steps=s.sft_steps,
                              warmup_ratio=0.05, seed=s.seed, max_length=64, progress=s.progress,
                              tensorboard=False, device="cpu", overwrite=True)  # the demo's own folder
        sft = DPOFastTrainer(sft_cfg, tokenizer=tokenizer, log=log)
        sft_result = sft.train()
        sft_model = sft.model

        # 2) DPO with the SFT model as the reference
        if s.on_policy:
            dpo_rows, n_model = on_policy_pairs(sft_model, tokenizer, dpo_rows, max_new_tokens=s.max_new_tokens)
            log(f"\nDPO pairs: chosen follows the rule; rejected is the SFT model's own greedy answer for "
                f"{n_model} of {len(dpo_rows)} prompts (where it breaks the rule), a generated near miss otherwise")
        compare = [t for t in (s.compare_loss_type or []) if t]
        if compare == list(s.loss_type):
            compare = []
        compare_model = copy.deepcopy(sft_model) if compare else None  # DPO trains sft_model in place
        before, after, dpo_result, held_out = _dpo_run(s, list(s.loss_type), sft_model, tokenizer, dpo_rows,
                                                       prompts, os.path.join(s.output, "dpo"), log)
        columns = [(f"after DPO ({','.join(s.loss_type)})", after, dpo_result.eval_metrics)]
        compared = None
        if compare:
            # the same SFT checkpoint, the same pairs and the same held-out split
            _, c_after, c_result, c_held_out = _dpo_run(s, compare, compare_model, tokenizer, dpo_rows, prompts,
                                                        os.path.join(s.output, "dpo_" + "_".join(compare)), log,
                                                        measure_before=False)
            if _pair_ids(c_held_out) != _pair_ids(held_out):
                raise RuntimeError("compare run: the held-out split differs from the main run's")
            columns.append((f"after DPO ({','.join(compare)})", c_after, c_result.eval_metrics))
            compared = {"loss_type": compare, "after": c_after, "dpo": c_result, "plot": c_result.plot_path}
        elapsed = time.perf_counter() - t_start
        table = format_table(before, after, dpo_result.eval_metrics, n_pairs=len(held_out), n_prompts=len(prompts),
                             columns=columns)
        log("\n" + table)
        plots = [sft_result.plot_path, dpo_result.plot_path] + ([compared["plot"]] if compared else [])
        runs = [(list(s.loss_type), after, dpo_result)] + ([(compare, compared["after"], compared["dpo"])]
                                                           if compared else [])
        summary = write_summary(s, command=command or demo_command(s), threads=threads, n_params=n_params,
                                n_pairs=len(held_out), n_prompts=len(prompts), before=before, runs=runs,
                                table=table, plots=plots, seconds=elapsed)
        log(f"\nplots: {', '.join(str(x) for x in plots)}")
        log(f"numbers of this run: {summary}")
        log(f"demo finished in {elapsed:.0f} s")
        return {"before": before, "after": after, "sft": sft_result, "dpo": dpo_result, "seconds": elapsed,
                "plot": dpo_result.plot_path, "compare": compared, "prompts": prompts, "summary": summary}
    finally:
        torch.set_num_threads(previous_threads)


def fresh_rows(n: int, seed: int, exclude: Sequence[str] = ()) -> List[Dict[str, str]]:
    """`n` demo rows drawn from `seed` with distinct prompts, none of them in `exclude`.

    The demo's held-out data must not share a prompt with any training row: random draws of short
    lists repeat, so repeats are dropped and more rows are drawn.
    """
    from dpo_fast.demo_task import make_preference_dataset

    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    seen, out = set(exclude), []
    for attempt in range(8):
        for row in make_preference_dataset(max(2 * n, 16), seed=seed + attempt * 1_000_003):
            if len(out) == n:
                return out
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                out.append(row)
    if len(out) < n:
        raise ValueError(f"n: could not draw {n} rows whose prompts avoid the {len(set(exclude))} excluded ones")
    return out


def _dpo_run(s: DemoSettings, loss_type: List[str], model: torch.nn.Module, tokenizer: Any,
             rows: Sequence[Dict[str, Any]], prompts: Sequence[str], output: str, log, *,
             measure_before: bool = True) -> tuple:
    """One DPO run of the demo on `model` (trained in place): (before, after, result, held-out examples)."""
    from dpo_fast.train import DPOFastTrainer, TrainConfig

    mode = f"LoRA r={s.lora_r}" if s.dpo_lora else "full fine-tune"
    log(f"\n[DPO] ({mode}, loss {','.join(loss_type)}, beta {s.beta}): {s.dpo_steps} steps "
        f"on {s.n_dpo} pairs ({s.eval_fraction:.0%} held out)")
    cfg = TrainConfig(model=None, data=list(rows), output=output, stage="dpo", use_lora=s.dpo_lora,
                      lora_r=s.lora_r, lora_alpha=s.lora_r, lr=s.dpo_lr, batch_size=s.dpo_batch,
                      max_steps=s.dpo_steps, beta=s.beta, loss_type=list(loss_type),
                      eval_fraction=s.eval_fraction, warmup_ratio=0.1, seed=s.seed, max_length=64,
                      eval_steps=-(-s.dpo_steps // (s.dpo_evals + 1)) if s.dpo_evals > 0 else None,
                      progress=s.progress, tensorboard=False, device="cpu", overwrite=True)  # the demo's own folder
    trainer = DPOFastTrainer(cfg, model=model, tokenizer=tokenizer, log=log)
    trainer.setup()
    held_out = trainer.eval_examples
    before = None
    if measure_before:  # before any DPO step the policy equals its reference (same weights / LoRA B = 0)
        before = {
            "reward_accuracy": 0.5,  # policy == reference: all implicit rewards are 0 (chance)
            "logp_accuracy": logp_preference_accuracy(trainer.model, held_out, trainer.collate),
            "win_rate": win_rate(trainer.model, tokenizer, prompts, s.max_new_tokens),
        }
    result = trainer.train()
    after = {
        "reward_accuracy": result.eval_metrics.get("eval_rewards/accuracies", float("nan")),
        "logp_accuracy": logp_preference_accuracy(trainer.model, held_out, trainer.collate),
        "win_rate": win_rate(trainer.model, tokenizer, prompts, s.max_new_tokens),
    }
    return before, after, result, held_out


def demo_command(s: DemoSettings) -> str:
    """The `dpo-fast demo` command line that gives `s` (its options that differ from the defaults)."""
    d, args = DemoSettings(), ["dpo-fast", "demo"]
    flags = [("output", "--output"), ("seed", "--seed"), ("sft_steps", "--sft-steps"), ("dpo_steps", "--dpo-steps"),
             ("dpo_lr", "--dpo-lr"), ("beta", "--beta"), ("threads", "--threads")]
    for name, flag in flags:
        if getattr(s, name) != getattr(d, name) and not (name == "threads" and s.threads is None):
            args += [flag, str(getattr(s, name))]
    if list(s.loss_type) != list(d.loss_type):
        args += ["--loss-type", ",".join(s.loss_type)]
    if list(s.compare_loss_type) != list(d.compare_loss_type):
        args += ["--compare-loss-type", ",".join(s.compare_loss_type) or "none"]
    if s.dpo_lora:
        args.append("--lora")
    others = [f.name for f in DemoSettings.__dataclass_fields__.values()
              if f.name not in {n for n, _ in flags} | {"loss_type", "compare_loss_type", "dpo_lora", "progress"}
              and getattr(s, f.name) != getattr(d, f.name)]
    text = " ".join(args)
    return text + (f"  (and settings with no command-line option: {', '.join(others)})" if others else "")


def write_summary(s: DemoSettings, *, command: str, threads: int, n_params: int, n_pairs: int, n_prompts: int,
                  before: Dict[str, float], runs: Sequence[tuple], table: str, plots: Sequence[Optional[str]],
                  seconds: float) -> str:
    """Write OUTPUT/summary.json: what was run, when, and the numbers it printed. Returns its path.

    `runs`: (loss_type, after, TrainResult) per DPO run, the main run first.
    """
    import transformers

    from dpo_fast import __version__

    summary = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": s.seed,
        "settings": asdict(s),
        "cpu_threads": threads,
        "model_parameters": n_params,
        "held_out_pairs": n_pairs,
        "generation_prompts": n_prompts,
        "after_sft": before,
        "dpo_runs": [
            {"loss_type": list(loss_type), "after_dpo": after,
             "change": {k: after[k] - before[k] for k in before},
             "eval_metrics": dict(result.eval_metrics), "plot": result.plot_path}
            for loss_type, after, result in runs
        ],
        "table": table.splitlines(),
        "plots": [p for p in plots if p],
        "seconds": round(seconds, 1),
        "versions": {"dpo_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    os.makedirs(s.output, exist_ok=True)
    path = os.path.join(s.output, SUMMARY_FILE)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    return path


def _pair_ids(examples: Sequence[Dict[str, Any]]) -> List[tuple]:
    """The token ids of each tokenized pair (to check that two runs hold out the same pairs)."""
    return [(list(e["prompt_ids"]), list(e["chosen_ids"]), list(e["rejected_ids"])) for e in examples]


def _count_model(config) -> List[torch.nn.Parameter]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(config).parameters())


def format_table(before: Dict[str, float], after: Dict[str, float], eval_metrics: Dict[str, float], *,
                 n_pairs: int, n_prompts: int, columns: Optional[Sequence[tuple]] = None) -> str:
    """The before/after table the demo prints.

    `columns`: (label, after, eval_metrics) per DPO run, all from the same SFT checkpoint; the first
    is the demo's main run. Default: one column, "after DPO", from `after` and `eval_metrics`.
    """
    columns = list(columns) if columns else [("after DPO", after, eval_metrics)]
    rows = [
        (f"held-out reward accuracy ({n_pairs} pairs)*", "reward_accuracy"),
        ("held-out log-prob preference accuracy", "logp_accuracy"),
        (f"greedy win rate, judged by the rule ({n_prompts} prompts)", "win_rate"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    col = max(11, *(len(c[0]) + 2 for c in columns))
    lines = [f"{'':<{width}}{'after SFT':>11}" + "".join(f"{c[0]:>{col}}{'change':>9}" for c in columns)]
    for label, key in rows:
        b = before[key]
        lines.append(f"{label:<{width}}{b:>11.3f}" + "".join(f"{c[1][key]:>{col}.3f}{c[1][key] - b:>+9.3f}"
                                                              for c in columns))
    lines.append("* before DPO the policy is its own reference, every implicit reward is 0: chance (0.5).")
    for name, a, metrics in columns:
        lines.append(f"  held-out reward margin {name}: {metrics.get('eval_rewards/margins', float('nan')):.3f}")
    for name, a, _ in columns:
        gain = a["win_rate"] - before["win_rate"]
        lines.append((f"{name.replace('after ', '')}: " if len(columns) > 1 else "")
                     + f"DPO moved the greedy win rate from {before['win_rate']:.1%} to {a['win_rate']:.1%} "
                     f"({gain * 100:+.1f} points) and the log-prob preference accuracy from "
                     f"{before['logp_accuracy']:.1%} to {a['logp_accuracy']:.1%}.")
    if len(columns) > 1:
        lines.append("Every column starts from the same SFT checkpoint with the same pairs; \"sft\" in a loss adds the "
                     "NLL of the chosen completion (RPO), so the sigmoid-only column is DPO's effect on its own.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dpo-fast demo` options."""
    d = DemoSettings()
    parser.add_argument("--output", default=d.output, help="where the runs, metrics and plots go")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--sft-steps", type=int, default=d.sft_steps)
    parser.add_argument("--dpo-steps", type=int, default=d.dpo_steps)
    parser.add_argument("--dpo-lr", type=float, default=d.dpo_lr)
    parser.add_argument("--beta", type=float, default=d.beta)
    parser.add_argument("--loss-type", default=",".join(d.loss_type),
                        help="DPO loss of the main run; sigmoid,sft is RPO (DPO + NLL of the chosen completion)")
    parser.add_argument("--compare-loss-type", default=",".join(d.compare_loss_type),
                        help="a second DPO run from the same SFT checkpoint and pairs, shown as its own column "
                             "(default: plain sigmoid DPO); 'none' skips it")
    parser.add_argument("--lora", action="store_true", help="DPO with LoRA instead of a full fine-tune")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """DemoSettings from parsed `dpo-fast demo` options."""
    return replace(DemoSettings(), output=args.output, seed=args.seed, sft_steps=args.sft_steps,
                   dpo_steps=args.dpo_steps, dpo_lr=args.dpo_lr, beta=args.beta,
                   loss_type=[t for t in args.loss_type.split(",") if t], dpo_lora=args.lora,
                   compare_loss_type=[t for t in args.compare_loss_type.split(",")
                                      if t and t.lower() != "none"],
                   threads=args.threads, progress=not args.no_progress)
