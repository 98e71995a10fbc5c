"""PNG plots of a benchmark run (matplotlib, Agg backend: no display needed).

* ``<level>_<group>.png``: peak extra memory and median time vs tokens, one line per method, one
  figure per (level, model, kind, mode) group of cases.
* ``fit_<model>.png``: the longest sequence and the largest batch of pairs per method, per cap.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import OK, Cell, fmt_cap  # noqa: E402
from benchmarks.fit import FitResult  # noqa: E402


def _group_of(cell: Cell) -> str:
    p = cell.params
    if cell.level == "head":
        return f"head_{p.get('model')}_{p.get('kind')}_{p.get('mode')}"
    return f"{cell.level}_{p.get('model')}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_cells(cells: Sequence[Cell], out_dir: str, *, device_label: str) -> List[str]:
    """Memory and time vs tokens per group; returns the written paths."""
    groups: Dict[str, List[Cell]] = defaultdict(list)
    for c in cells:
        if c.status == OK:
            groups[_group_of(c)].append(c)
    paths = []
    for group, gcells in groups.items():
        fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
        by_method: Dict[str, List[Cell]] = defaultdict(list)
        for c in gcells:
            by_method[c.method].append(c)
        for method, mcells in by_method.items():
            mcells.sort(key=lambda c: c.tokens)
            x = [c.tokens for c in mcells]
            style = dict(marker="o", linewidth=2.5 if method == "dpo_fast" else 1.5, label=method)
            ax_mem.plot(x, [c.peak_extra_mb for c in mcells], **style)
            ax_time.plot(x, [c.median_ms for c in mcells], **style)
        for ax, ylabel in ((ax_mem, "peak extra memory (MB)"), (ax_time, "median time (ms)")):
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len({c.tokens for c in gcells}) > 1:
                ax.set_xscale("log", base=2)
        ax_time.legend(fontsize=8)
        fig.suptitle(f"{group} — {device_label}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, _safe(group) + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_fit(results: Sequence[FitResult], out_dir: str, *, device_label: str) -> List[str]:
    """Bars of the largest fitting seq_len and pairs per method and cap; one figure per model."""
    paths = []
    for model in dict.fromkeys(r.model for r in results):
        rs = [r for r in results if r.model == model and r.status == "ok"]
        if not rs:
            continue
        methods = list(dict.fromkeys(r.method for r in rs))
        caps = sorted({r.cap_gb for r in rs})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        width = 0.8 / max(1, len(methods))
        for ax, what, ylabel in ((axes[0], "seq_len", "longest sequence (tokens, 1 pair)"),
                                 (axes[1], "pairs", "largest batch (pairs)")):
            for k, method in enumerate(methods):
                vals = []
                for cap in caps:
                    r = next((r for r in rs if r.method == method and r.cap_gb == cap and r.what == what), None)
                    vals.append(0 if r is None or r.best is None else r.best)
                ax.bar([i + k * width for i in range(len(caps))], vals, width, label=method)
            ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(caps))])
            simulated = any(r.simulated for r in rs)
            ax.set_xticklabels([fmt_cap(c) + (" (sim.)" if simulated else "") for c in caps])
            ax.set_xlabel("memory cap")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, axis="y")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"fit {model} — {device_label}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, _safe(f"fit_{model}") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_headline(rows: Sequence[dict], out_path: str, *, title: str,
                  methods: Sequence[str] = ("trl", "dpo_fast", "dpo_fast_all")) -> str:
    """Bars of step time and peak memory (total and above the weights) per method, labelled with the ratio
    to the first method: the README's headline figure, drawn from a results.json "step_vs_baseline" list."""
    by_method = {r["method"]: r for r in rows if r.get("status") == OK}
    names = [m for m in methods if m in by_method]
    if len(names) < 2:
        raise ValueError(f"need at least two of {list(methods)} measured ok, got {sorted(by_method)}")
    base = by_method[names[0]]
    panels = (("median_ms", "step time (ms)"), ("peak_total_mb", "peak GPU memory, total (MB)"),
              ("peak_extra_mb", "peak memory above weights (MB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.8))
    for ax, (key, label) in zip(axes, panels):
        values = [by_method[m][key] for m in names]
        bars = ax.bar(names, values, color=["#999999"] + ["#1f77b4"] * (len(names) - 1))
        for bar, v in zip(bars, values):
            ax.annotate(f"{v / base[key]:.2f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=9)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(values) * 1.15)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def headline_main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m benchmarks.plots RESULTS_JSON OUT_PNG [--case CASE]: the headline figure of a step run."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=headline_main.__doc__)
    p.add_argument("results", help="a step run's results.json")
    p.add_argument("out", help="PNG path")
    p.add_argument("--case", help="which case (default: the first)")
    p.add_argument("--methods", nargs="+", default=["trl", "dpo_fast", "dpo_fast_all"])
    args = p.parse_args(argv)
    with open(args.results) as fh:
        data = json.load(fh)
    rows = data.get("step_vs_baseline") or []
    case = args.case or (rows[0]["case"] if rows else None)
    rows = [r for r in rows if r["case"] == case]
    if not rows:
        raise SystemExit(f"{args.results}: no step_vs_baseline rows for case {case!r}")
    env = data.get("environment", {})
    title = (f"{case}, QLoRA DPO step (policy + reference), {env.get('gpu', env.get('device'))}, "
             f"torch {env.get('torch')}, {str(env.get('date', ''))[:10]}")
    print(plot_headline(rows, args.out, title=title, methods=args.methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(headline_main())
