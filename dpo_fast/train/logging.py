"""Run logging: a tqdm progress bar, metrics.jsonl (TRL's metric names), TensorBoard, a PNG plot.

metrics.jsonl has one JSON object per logged step: {"step", "epoch", "loss", "rewards/chosen",
"rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
"learning_rate", "grad_norm", "tokens_per_second"}; eval records carry TRL's "eval_" prefix.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


class MetricsLogger:
    """Appends step records to OUTPUT/metrics.jsonl and mirrors them to TensorBoard when installed."""

    def __init__(self, output_dir: str, *, tensorboard: bool = True, resume_step: Optional[int] = None) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, METRICS_FILE)
        if resume_step is None:
            open(self.path, "w", encoding="utf-8").close()
        else:  # keep what was logged up to the resumed step, drop the rest
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as fh:
                for r in kept:
                    fh.write(json.dumps(r) + "\n")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(output_dir, "runs"))
            except Exception:  # tensorboard is optional
                self.writer = None

    def log(self, step: int, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """Write one record; returns it (floats only, non-finite values kept as strings)."""
        record: Dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            record[key] = _to_float(value)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _to_float(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return value


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Records of a metrics.jsonl file (empty list when it does not exist).

    A crash while a record was being written leaves a torn last line: it is dropped with a
    warning (the run resumes from a checkpoint and logs that step again). An unreadable line
    anywhere else means the file was damaged otherwise: a ValueError names the file and line.
    """
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [(n, line) for n, line in enumerate(fh, start=1) if line.strip()]
    records: List[Dict[str, Any]] = []
    for i, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not a record")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            if i == len(lines) - 1:
                warnings.warn(f"{path}, line {lineno}: dropped a torn last record ({detail}); "
                              "a run stopped while writing it", RuntimeWarning, stacklevel=2)
                break
            raise ValueError(f"{path}, line {lineno}: not a metrics record ({detail}); the file is damaged: "
                             "remove that line (or the file, to drop the logged history) and retry") from None
        records.append(record)
    return records


def run_title(stage: str, loss_type: Optional[Sequence[str]] = None, beta: Optional[float] = None) -> str:
    """A plot title naming the run's loss, e.g. "dpo_fast dpo: sigmoid + sft (RPO), beta 0.1"."""
    if stage != "dpo" or not loss_type:
        return f"dpo_fast {stage}"
    types = loss_type.split(",") if isinstance(loss_type, str) else [str(t) for t in loss_type]
    name = " + ".join(types)
    if sorted(types) == ["sft", "sigmoid"]:
        name += " (RPO: DPO + NLL of the chosen)"
    elif types == ["sigmoid"]:
        name += " (plain DPO)"
    return f"dpo_fast dpo: {name}" + (f", beta {beta:g}" if beta is not None else "")


def plot_points(records: Iterable[Dict[str, Any]], key: str) -> List[Tuple[float, float]]:
    """(step, value) of `key` in the records, as plotted.

    TRL's reward accuracy counts a tie as a miss, so where every pair ties (the record's reward
    accuracy and mean margin are both exactly 0: every margin is 0, as at step 0 when the policy
    is its reference) it reads 0.0 although no pair is ranked either way; such a point is
    plotted at chance, 0.5.
    """
    prefix = "eval_" if key.startswith("eval_") else ""
    points = []
    for r in records:
        value = r.get(key)
        if not isinstance(value, float):
            continue
        if key.endswith("rewards/accuracies") and value == 0.0 and r.get(prefix + "rewards/margins") == 0.0:
            value = 0.5
        points.append((r["step"], value))
    return points


def plot_metrics(records: Iterable[Dict[str, Any]], png_path: str, title: str = "dpo_fast") -> str:
    """Loss, reward accuracy and reward margins over steps (train and eval) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    panels = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
    panels = [p for p in panels if any(p[0] in r or f"eval_{p[0]}" in r for r in records)] or panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            pts = plot_points(records, prefix + key)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=("eval" if prefix else "train"), markersize=4)
        if key == "rewards/accuracies":
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="chance (0.5)")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


class ProgressBar:
    """tqdm bar over optimizer steps with loss, reward accuracy, margin and tokens/s."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "dpo") -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, metrics: Dict[str, Any]) -> None:
        if self.bar is None:
            return
        post = {}
        for key, short in (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                           ("tokens_per_second", "tok/s")):
            if isinstance(metrics.get(key), float):
                post[short] = f"{metrics[key]:.3g}" if short != "tok/s" else f"{metrics[key]:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
