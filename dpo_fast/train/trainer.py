"""`DPOFastTrainer`: data, model, loss, optimizer, logging and checkpoints composed into one run.

    trainer = DPOFastTrainer(TrainConfig(model="ckpt/", data="pairs.jsonl", output="out/"))
    result = trainer.train()

Every part lives in its own module of dpo_fast.train; this class only wires them together.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dpo_fast.data import (LengthGroupedBatchSampler, PreferenceCollator, example_length, load_preference_rows,
                           split_eval, tokenize_pairs)
from dpo_fast.dpo import compute_dpo_loss
from dpo_fast.forward import sequence_logps
from dpo_fast.patching.reference import describe_reference, reference_model

from . import checkpoint as ckpt
from .config import TrainConfig
from .logging import PLOT_FILE, MetricsLogger, ProgressBar, plot_metrics, read_metrics, run_title
from .loop import LoopState, StopFlag, autocast_dtype, evaluate, run_loop
from .model_loading import LoadedModel, load_model, resolve_device
from .optim import build_optimizer, build_scheduler
from . import ref_cache
from .sft import sft_loss

FINAL_STATE_FILE = "train_config.json"


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: str
    steps: int
    interrupted: bool
    train_metrics: Dict[str, float] = field(default_factory=dict)  # the last logged step
    eval_metrics: Dict[str, float] = field(default_factory=dict)  # final evaluation (eval_ prefix)
    initial_eval_metrics: Dict[str, float] = field(default_factory=dict)  # before the first step
    checkpoint_dir: Optional[str] = None
    merged_dir: Optional[str] = None
    plot_path: Optional[str] = None
    metrics_path: Optional[str] = None
    ref_cache_hits: Optional[List[bool]] = None  # per split, when reference log-probs were precomputed
    history: List[Dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class DPOFastTrainer:
    """One DPO (or SFT, with config.stage == "sft") training run.

    model / tokenizer: optional in-memory objects replacing config.model / config.tokenizer.
    ref_model: an explicit reference model (default: the rule of dpo_fast.patching.reference; a
    frozen copy of the starting weights for a full fine-tune).
    """

    def __init__(self, config: TrainConfig, *, model: Optional[torch.nn.Module] = None, tokenizer: Any = None,
                 ref_model: Optional[torch.nn.Module] = None, log: Callable[[str], None] = print) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if config.data is None:
            raise ValueError("data: give a data file, a saved dataset or a list of rows")
        self.cfg = config
        self.log = log
        self._given_model, self._given_tokenizer = model, tokenizer
        self.ref_model = ref_model
        self.device = resolve_device(config.device)
        self._ready = False

    # ------------------------------------------------------------------------------ set-up
    def setup(self) -> "DPOFastTrainer":
        """Load model, data, reference log-probs, optimizer and scheduler (idempotent)."""
        if self._ready:
            return self
        cfg = self.cfg
        seed_everything(cfg.seed)
        loaded: LoadedModel = load_model(cfg, model=self._given_model, tokenizer=self._given_tokenizer,
                                         device=self.device)
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if not loaded.quantized:  # bitsandbytes places quantized weights itself
            self.model.to(self.device)
        is_peft = ckpt.is_peft_model(self.model)
        if cfg.stage == "dpo" and not cfg.reference_free and not is_peft and self.ref_model is None \
                and not cfg.precompute_ref:
            # full fine-tune: the reference is a frozen copy of the starting weights
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

        rows, load_report = load_preference_rows(cfg.data, on_bad_row=cfg.on_bad_row)
        self.log(load_report.summary())
        examples, tok_report = tokenize_pairs(rows, self.tokenizer, max_length=cfg.max_length,
                                              max_prompt_length=cfg.max_prompt_length,
                                              truncation_mode=cfg.truncation_mode)
        self.log(tok_report.summary())
        if not examples:
            raise ValueError("data: no usable preference pairs after loading and tokenization")
        self.train_examples, self.eval_examples = split_eval(examples, cfg.eval_fraction, seed=cfg.seed)
        self.log(f"train pairs: {len(self.train_examples)}, eval pairs: {len(self.eval_examples)}")
        pad = self.tokenizer.pad_token_id
        self.collate = PreferenceCollator(int(pad if pad is not None else self.tokenizer.eos_token_id))

        self.ref_cache_hits: Optional[List[bool]] = None
        if cfg.precompute_ref and cfg.stage == "dpo" and not cfg.reference_free:
            self._precompute_reference()

        lengths = [example_length(e) for e in self.train_examples]
        if cfg.group_by_length:
            sampler = LengthGroupedBatchSampler(lengths, cfg.batch_size, seed=cfg.seed)
            self.order_fn = sampler.batches
        else:
            self.order_fn = self._shuffled_batches
        self.batches_per_epoch = len(self.order_fn(0))
        steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / cfg.grad_accum))
        self.total_steps = int(cfg.max_steps) if cfg.max_steps else max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self._ready = True
        return self

    def _shuffled_batches(self, epoch: int) -> List[List[int]]:
        order = list(range(len(self.train_examples)))
        random.Random(f"{self.cfg.seed}:{epoch}").shuffle(order)
        b = self.cfg.batch_size
        return [order[i:i + b] for i in range(0, len(order), b)]

    # ------------------------------------------------------------------------------ losses
    def loss_fn(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The stage's loss on one preference batch."""
        if self.cfg.stage == "sft":
            return sft_loss(model, batch)
        return compute_dpo_loss(model, batch, ref_model=self.ref_model, **self.cfg.loss_options())

    def reference_logps(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reference sequence log-probs [B], [B]: the same computation compute_dpo_loss runs on the fly."""
        ref_model = self.ref_model
        if ref_model is None and not ckpt.is_peft_model(model):
            ref_model = model  # full fine-tune, precomputed before any update: the model is the reference
        with reference_model(model, ref_model=ref_model) as ref:
            return sequence_logps(ref, batch, average_log_prob=self.cfg.average_log_prob, ld_alpha=self.cfg.ld_alpha)

    def reference_description(self) -> str:
        if self.ref_model is None and not ckpt.is_peft_model(self.model):
            return "initial-weights"
        return describe_reference(self.model, self.ref_model)

    def _precompute_reference(self) -> None:
        cfg = self.cfg
        settings = {"average_log_prob": cfg.average_log_prob, "ld_alpha": cfg.ld_alpha,
                    "precision": str(autocast_dtype(self.device, cfg.precision)), "device": self.device.type,
                    "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                    "truncation_mode": cfg.truncation_mode}
        hits = []
        for name in ("train_examples", "eval_examples"):
            examples = getattr(self, name)
            if not examples:
                continue
            key = ref_cache.cache_key(model_id=self.loaded.model_id, reference=self.reference_description(),
                                      examples=examples, settings=settings)
            chosen, rejected, hit = ref_cache.load_or_compute(
                cfg.output, key,
                lambda: ref_cache.compute_reference_logps(
                    self.model, examples, self.collate, self.reference_logps, batch_size=cfg.batch_size * 2,
                    device=self.device, autocast_dtype=autocast_dtype(self.device, cfg.precision)),
                expected_len=len(examples))
            self.log(f"reference log-probs for {len(examples)} {name.split('_')[0]} pairs: "
                     + ("loaded from cache" if hit else "computed and cached")
                     + f" ({ref_cache.cache_path(cfg.output, key)})")
            setattr(self, name, ref_cache.attach_reference_logps(examples, chosen, rejected))
            hits.append(hit)
        self.ref_cache_hits = hits

    # ------------------------------------------------------------------------------ eval
    def evaluate(self, examples: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
        """Mean loss and TRL metrics (eval_ prefix) over the eval split (or the given examples)."""
        self.setup()
        examples = self.eval_examples if examples is None else examples
        return evaluate(self.model, examples, self.collate, self.loss_fn, batch_size=self.cfg.batch_size,
                        device=self.device, precision=self.cfg.precision)

    # ------------------------------------------------------------------------------ train
    def _resume_dir(self) -> Optional[str]:
        resume = self.cfg.resume
        if not resume:
            return None
        if isinstance(resume, str):
            if not os.path.isdir(resume):
                raise ValueError(f"resume: {resume!r} is not a directory")
            return resume
        found = ckpt.latest_checkpoint(self.cfg.output)
        if found is None:
            self.log(f"resume: no checkpoint in {self.cfg.output!r}; starting from scratch")
        return found

    def save(self, state: LoopState) -> str:
        """Write OUTPUT/checkpoint-<step> (resumable) and the current weights at OUTPUT's top level."""
        cfg = self.cfg
        directory = os.path.join(cfg.output, f"checkpoint-{state.step}")
        saved = dict(state.to_dict(), stage=cfg.stage, seed=cfg.seed, config=cfg.to_dict())
        ckpt.save_checkpoint(directory, self.model, self.optimizer, self.scheduler, saved)
        ckpt.save_model_weights(self.model, cfg.output)
        return directory

    def train(self) -> TrainResult:
        """Run the training; returns a TrainResult (also after Ctrl-C, with interrupted=True)."""
        self.setup()
        cfg = self.cfg
        os.makedirs(cfg.output, exist_ok=True)
        with open(os.path.join(cfg.output, FINAL_STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(cfg.to_dict(), fh, indent=2, default=str)
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(cfg.output)

        state = LoopState(total_steps=self.total_steps, batches_per_epoch=self.batches_per_epoch)
        resume_dir = self._resume_dir()
        if resume_dir is not None:
            saved = ckpt.load_checkpoint(resume_dir, self.model, self.optimizer, self.scheduler)
            state.step, state.micro = int(saved["step"]), int(saved["micro"])
            if int(saved.get("total_steps", self.total_steps)) != self.total_steps:
                self.log(f"resume: the checkpoint planned {saved.get('total_steps')} steps, this run plans "
                         f"{self.total_steps}; the learning-rate schedule follows the checkpoint's")
            self.log(f"resumed from {resume_dir} at step {state.step}")
        result = TrainResult(output_dir=cfg.output, steps=state.step, interrupted=False,
                             ref_cache_hits=self.ref_cache_hits)
        logger = MetricsLogger(cfg.output, tensorboard=cfg.tensorboard,
                               resume_step=state.step if resume_dir is not None else None)
        if resume_dir is None and self.eval_examples:
            result.initial_eval_metrics = self.evaluate()
            logger.log(0, result.initial_eval_metrics)
        bar = ProgressBar(self.total_steps, initial=state.step, enabled=cfg.progress, desc=cfg.stage)

        def on_step(st: LoopState, record: Dict[str, float]) -> None:
            bar.update(record)
            if st.step % cfg.logging_steps == 0 or st.step == st.total_steps:
                st.history.append(logger.log(st.step, record))
            if cfg.eval_steps and self.eval_examples and st.step % cfg.eval_steps == 0 and st.step < st.total_steps:
                logger.log(st.step, self.evaluate())
            if cfg.save_steps and st.step % cfg.save_steps == 0 and st.step < st.total_steps:
                self.save(st)

        try:
            with StopFlag() as stop:
                run_loop(self.model, self.optimizer, self.scheduler, examples=self.train_examples,
                         collate=self.collate, order_fn=self.order_fn, loss_fn=self.loss_fn, state=state,
                         grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, device=self.device,
                         precision=cfg.precision, on_step=on_step, stop=stop)
        except KeyboardInterrupt:
            state.interrupted = True
        finally:
            bar.close()
        result.interrupted = state.interrupted
        result.steps = state.step
        result.history = state.history
        result.train_metrics = dict(state.history[-1]) if state.history else {}
        result.checkpoint_dir = self.save(state)
        if state.interrupted:
            self.log(f"interrupted at step {state.step}: checkpoint saved to {result.checkpoint_dir}; "
                     f"continue with --resume")
        elif self.eval_examples:
            result.eval_metrics = self.evaluate()
            logger.log(state.step, result.eval_metrics)
        logger.close()
        result.metrics_path = logger.path
        if cfg.plot:
            result.plot_path = plot_metrics(read_metrics(logger.path), os.path.join(cfg.output, PLOT_FILE),
                                            title=run_title(cfg.stage, cfg.loss_type, cfg.beta))
        if cfg.merge and not state.interrupted:
            result.merged_dir = ckpt.save_merged(self.model, os.path.join(cfg.output, "merged"), self.tokenizer)
        return result


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """Run one training described by config (see DPOFastTrainer for the keyword arguments)."""
    return DPOFastTrainer(config, **kwargs).train()
