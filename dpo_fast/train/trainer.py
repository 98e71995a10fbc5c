"""`DPOFastTrainer`: data, model, loss, optimizer, logging and checkpoints composed into one run.

    trainer = DPOFastTrainer(TrainConfig(model="ckpt/", data="pairs.jsonl", output="out/"))
    result = trainer.train()

Every part lives in its own module of dpo_fast.train; this class only wires them together. Launched
by torchrun or accelerate launch, the same run is data-parallel (dpo_fast.train.distributed): one
process per device, the model replicated (DDP) or sharded (`fsdp=True`, dpo_fast.train.fsdp), the data
split so that the optimizer steps are those of one process with batch_size * processes.
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
                           LoadReport, require_rows, split_eval, tokenize_pairs)
from dpo_fast.data_sources import DataSource, open_source, train_and_eval_sources
from dpo_fast.dpo import compute_dpo_loss
from dpo_fast.errors import UserError
from dpo_fast.forward import sequence_logps
from dpo_fast.schemas import Columns
from dpo_fast.patching.reference import describe_reference, reference_model
from dpo_fast.state import unwrap_parallel

from . import checkpoint as ckpt
from . import distributed
from . import run_identity
from .config import TrainConfig
from .logging import PLOT_FILE, MetricsLogger, ProgressBar, _to_float, plot_metrics, read_metrics, run_title
from .loop import LoopState, NonFiniteError, StopFlag, ZeroGradWatch, autocast_dtype, evaluate, run_loop
from .model_loading import LoadedModel, load_model
from .optim import build_optimizer, build_scheduler
from . import ref_cache
from .sft import scored_tokens, sft_loss

FINAL_STATE_FILE = "train_config.json"
#: loss types whose value couples the pairs of a batch: on several processes each computes them on its share
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired", "sft")


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

    Under torchrun / accelerate launch the constructor joins the process group (dpo_fast.train.distributed)
    and takes this process's device; only the main process logs and writes files.
    """

    def __init__(self, config: TrainConfig, *, model: Optional[torch.nn.Module] = None, tokenizer: Any = None,
                 ref_model: Optional[torch.nn.Module] = None, log: Callable[[str], None] = print) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if config.data is None:
            raise ValueError("data: give a data file, a saved dataset or a list of rows")
        self.cfg = config
        self.parallel = distributed.init_parallel(config.device, sharded=config.fsdp)
        self.log = log if self.parallel.is_main else _silent
        self._given_model, self._given_tokenizer = model, tokenizer
        self.ref_model = ref_model
        self.device = self.parallel.device
        if self.parallel.enabled and not config.patch:
            raise ValueError("patch: several processes train through a DDP / FSDP wrapper, which needs the dpo_fast "
                             "patch (drop --no-patch)")
        self._ready = False

    # ------------------------------------------------------------------------------ set-up
    def setup(self) -> "DPOFastTrainer":
        """Load model, data, reference log-probs, optimizer and scheduler (idempotent)."""
        if self._ready:
            return self
        cfg = self.cfg
        par = self.parallel
        self._prepare_output()
        seed_everything(cfg.seed)
        # the rows first (train and eval): a data source without usable rows fails in seconds, before the model loads
        train_source, eval_source = train_and_eval_sources(
            cfg.data, data_split=cfg.data_split, data_config=cfg.data_config, data_revision=cfg.data_revision,
            eval_data=cfg.eval_data, eval_split=cfg.eval_split)
        train_rows = self._rows(train_source)
        eval_rows = self._rows(eval_source) if eval_source is not None else None
        if cfg.fsdp:
            from .fsdp import load_sharded_model

            loaded: LoadedModel = load_sharded_model(cfg, par, model=self._given_model,
                                                     tokenizer=self._given_tokenizer)
        else:
            loaded = load_model(cfg, model=self._given_model, tokenizer=self._given_tokenizer, device=self.device)
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if not loaded.quantized and not cfg.fsdp:  # bitsandbytes places quantized weights itself
            self.model.to(self.device)
        is_peft = ckpt.is_peft_model(self.model)
        if cfg.stage == "dpo" and not cfg.reference_free and not is_peft and self.ref_model is None \
                and not cfg.precompute_ref:
            # full fine-tune: the reference is a frozen copy of the starting weights
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # what runs the loss: the model itself, or its DDP replica (an FSDP model is sharded in place)
        self.net = distributed.wrap_ddp(self.model, par) if par.enabled and not cfg.fsdp else self.model
        if par.enabled:
            torch.manual_seed(cfg.seed + 1_000_003 * par.rank)  # the processes' dropout masks differ

        examples = self._examples(train_source, *train_rows)
        if eval_rows is None:
            self.train_examples, self.eval_examples = split_eval(examples, cfg.eval_fraction, seed=cfg.seed)
        else:
            self.train_examples, self.eval_examples = examples, self._examples(eval_source, *eval_rows)
        self.log(f"train pairs: {len(self.train_examples)}, eval pairs: {len(self.eval_examples)}")
        # hashed once: the run identity and the reference cache's keys both read them
        self.data_fingerprints = {name: ref_cache.examples_fingerprint(getattr(self, name))
                                  for name in ("train_examples", "eval_examples")}
        pad = self.tokenizer.pad_token_id
        self.collate = PreferenceCollator(int(pad if pad is not None else self.tokenizer.eos_token_id))

        self.ref_cache_hits: Optional[List[bool]] = None
        if cfg.precompute_ref and cfg.stage == "dpo" and not cfg.reference_free:
            self._precompute_reference()

        # the global micro-batches: those of one process with batch_size * processes; each process runs a share
        self.global_batch_size = cfg.batch_size * par.world_size
        lengths = [example_length(e) for e in self.train_examples]
        if cfg.group_by_length:
            sampler = LengthGroupedBatchSampler(lengths, self.global_batch_size, seed=cfg.seed)
            self.order_fn = sampler.batches
        else:
            self.order_fn = self._shuffled_batches
        self.batches_per_epoch = len(self.order_fn(0))
        steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / cfg.grad_accum))
        self.total_steps = int(cfg.max_steps) if cfg.max_steps else max(1, math.ceil(cfg.epochs * steps_per_epoch))
        processes = f"{par.world_size} processes" if par.enabled else "1 process"
        self.log(f"global batch: {cfg.batch_size} pairs per micro-batch x {cfg.grad_accum} grad-accum x {processes} "
                 f"= {self.global_batch_size * cfg.grad_accum} pairs per optimizer step"
                 + (" (FSDP: model sharded)" if cfg.fsdp else " (DDP)" if par.enabled else ""))
        coupled = [t for t in cfg.loss_type if t in BATCH_COUPLED_LOSSES] if cfg.stage == "dpo" else []
        if par.enabled and coupled:
            self.log(f"note: loss type(s) {coupled} couple the pairs of a batch; each process computes them on its "
                     f"{cfg.batch_size} pairs (as TRL under DDP does), so they differ from one process's values")
        self.identity = run_identity.build_identity(
            cfg, model=self.loaded.fingerprint or self.loaded.model_id,
            tokenizer=self._tokenizer_fingerprint(),
            train_data=self.data_fingerprints["train_examples"], eval_data=self.data_fingerprints["eval_examples"],
            global_batch_size=self.global_batch_size)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self._ready = True
        return self

    def _rows(self, source: DataSource) -> Tuple[List[Dict[str, Any]], LoadReport]:
        """The preference rows of one data source (schemas mapped); UserError when none is usable."""
        cfg = self.cfg
        columns = Columns(prompt=cfg.prompt_column, chosen=cfg.chosen_column, rejected=cfg.rejected_column,
                          system=cfg.system_column)
        rows, report = load_preference_rows(open_source(source), on_bad_row=cfg.on_bad_row, columns=columns,
                                            name=source.label)
        require_rows(report, what=_flag_name(source.flag))
        return rows, report

    def _examples(self, source: DataSource, rows: List[Dict[str, Any]], load_report: LoadReport
                  ) -> List[Dict[str, Any]]:
        """The tokenized pairs of one source's rows (bad rows and dropped pairs reported)."""
        cfg = self.cfg
        self.log(load_report.summary())
        examples, tok_report = tokenize_pairs(rows, self.tokenizer, max_length=cfg.max_length,
                                              max_prompt_length=cfg.max_prompt_length,
                                              truncation_mode=cfg.truncation_mode)
        self.log(tok_report.summary())
        if not examples:
            raise UserError(f"{_flag_name(source.flag)}: none of the {tok_report.n_in} pairs of {source.label} is "
                            f"left after tokenization with max_length={cfg.max_length} "
                            f"({tok_report.summary().splitlines()[0]})")
        return examples

    def _tokenizer_fingerprint(self) -> str:
        if getattr(self, "_tok_fp", None) is None:
            self._tok_fp = run_identity.tokenizer_fingerprint(self.tokenizer)
        return self._tok_fp

    def _main_decides(self, check: Callable[[], None]) -> None:
        """Run `check` on the main process; its UserError is raised on every process (none waits forever)."""
        problem = None
        if self.parallel.is_main:
            try:
                check()
            except UserError as exc:
                problem = str(exc)
        problem = self.parallel.broadcast_object(problem)
        if problem is not None:
            raise UserError(problem)

    def _prepare_output(self) -> None:
        """Before anything expensive: refuse an output folder holding another run's outputs unless `overwrite`
        (delete them) or `resume` (continue that run, checked against its recorded identity in train())."""
        cfg = self.cfg

        def check() -> None:
            run_identity.check_output_folder(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume)
            if cfg.overwrite and run_identity.holds_a_run(cfg.output):
                inputs = [p for p in (cfg.model, cfg.adapter, cfg.tokenizer) if isinstance(p, str)]
                if any(os.path.abspath(p) == os.path.abspath(cfg.output) for p in inputs):
                    raise UserError(f"overwrite: {cfg.output!r} is also an input of this run (model, adapter or "
                                    "tokenizer); it would be deleted: write the run to another --output")
                removed = run_identity.clear_run_outputs(cfg.output)
                self.log(f"overwrite: deleted {len(removed)} outputs of an earlier run in {cfg.output} "
                         f"({', '.join(os.path.basename(p) for p in removed[:5])}{', ...' if len(removed) > 5 else ''})")

        self._main_decides(check)

    def _shuffled_batches(self, epoch: int) -> List[List[int]]:
        order = list(range(len(self.train_examples)))
        random.Random(f"{self.cfg.seed}:{epoch}").shuffle(order)
        b = self.global_batch_size
        return [order[i:i + b] for i in range(0, len(order), b)]

    # ------------------------------------------------------------------------------ losses
    def loss_fn(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The stage's loss on one preference batch."""
        if self.cfg.stage == "sft":
            return sft_loss(model, batch)
        return compute_dpo_loss(model, batch, ref_model=self.ref_model, **self.cfg.loss_options())

    def loss_weight(self, batch: Dict[str, torch.Tensor]) -> float:
        """What the stage's loss is a mean over in `batch`: pairs (DPO) or scored tokens (SFT)."""
        return scored_tokens(batch) if self.cfg.stage == "sft" else float(batch["input_ids"].shape[0] // 2)

    def reference_logps(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reference sequence log-probs [B], [B]: the same computation compute_dpo_loss runs on the fly."""
        ref_model = self.ref_model
        if ref_model is None and not ckpt.is_peft_model(unwrap_parallel(model)):
            ref_model = model  # full fine-tune, precomputed before any update: the model is the reference
        with reference_model(model, ref_model=ref_model) as ref:
            return sequence_logps(ref, batch, average_log_prob=self.cfg.average_log_prob, ld_alpha=self.cfg.ld_alpha)

    def reference_description(self) -> str:
        if self.ref_model is None and not ckpt.is_peft_model(self.model):
            return "initial-weights"
        return describe_reference(self.model, self.ref_model)

    def reference_cache_key(self, examples: Sequence[Dict[str, Any]],
                            fingerprint: Optional[str] = None) -> str:
        """The reference cache's key for `examples`: everything that determines their reference log-probs.

        The starting weights (path, sizes, times and sampled contents of the weight files; the adapter's
        files; a random init's config and seed), how they are loaded (4-bit, dtype, patched), which reference
        is used, the tokenizer, every token of the examples (prompt, chosen and rejected ids), the truncation
        settings, the loss settings that change a sequence log-prob, and the precision it is computed in.
        `fingerprint`: ref_cache.examples_fingerprint(examples), when already computed (setup keeps them).
        """
        cfg = self.cfg
        param = next(self.model.parameters(), None)
        settings = {"average_log_prob": cfg.average_log_prob, "ld_alpha": cfg.ld_alpha,
                    "precision": str(autocast_dtype(self.device, cfg.precision)), "device": self.device.type,
                    "dtype": str(param.dtype) if param is not None else None,
                    "load_in_4bit": bool(self.loaded.quantized), "patch": cfg.patch,
                    "prefix_sharing": cfg.prefix_sharing,
                    "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                    "truncation_mode": cfg.truncation_mode,
                    "tokenizer": self._tokenizer_fingerprint()}
        return ref_cache.cache_key(model_id=f"{self.loaded.model_id}:{self.loaded.fingerprint}",
                                   reference=self.reference_description(), examples=examples, settings=settings,
                                   fingerprint=fingerprint)

    def _precompute_reference(self) -> None:
        cfg = self.cfg
        hits = []
        for name in ("train_examples", "eval_examples"):
            examples = getattr(self, name)
            if not examples:
                continue
            key = self.reference_cache_key(examples, self.data_fingerprints[name])

            def compute(examples=examples):
                return ref_cache.compute_reference_logps(
                    self.net, examples, self.collate, self.reference_logps, batch_size=cfg.batch_size * 2,
                    device=self.device, autocast_dtype=autocast_dtype(self.device, cfg.precision))

            if self.parallel.enabled:
                chosen, rejected, hit = self._shared_reference_logps(key, examples, compute)
            else:
                chosen, rejected, hit = ref_cache.load_or_compute(cfg.output, key, compute, expected_len=len(examples),
                                                                  warn=self.log)
            self.log(f"reference log-probs for {len(examples)} {name.split('_')[0]} pairs: "
                     + ("loaded from cache" if hit else "computed and cached")
                     + f" ({ref_cache.cache_path(cfg.output, key)})")
            setattr(self, name, ref_cache.attach_reference_logps(examples, chosen, rejected))
            hits.append(hit)
        self.ref_cache_hits = hits

    def _shared_reference_logps(self, key: str, examples: List[Dict[str, Any]], compute: Callable
                                ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """Several processes: the main process's cache file, or each process computes its contiguous share
        (the same number of forwards everywhere, for FSDP's collectives), gathered in order; main writes it."""
        par, cfg = self.parallel, self.cfg
        cached = ref_cache.load_cached(cfg.output, key, expected_len=len(examples), warn=self.log) if par.is_main \
            else None
        cached = par.broadcast_object(cached)
        if cached is not None:
            return cached[0], cached[1], True
        mine = par.share(examples)
        bs = cfg.batch_size * 2
        chosen, rejected = compute(mine) if mine else (torch.zeros(0), torch.zeros(0))
        for _ in range(par.most_batches(len(examples), bs) - math.ceil(len(mine) / bs)):
            compute(examples[:1])  # a process with fewer batches runs the same forwards
        parts = par.gather_objects((chosen, rejected))
        chosen = torch.cat([c for c, _ in parts])
        rejected = torch.cat([r for _, r in parts])
        if par.is_main:
            ref_cache.write_cache(cfg.output, key, chosen, rejected)
        par.barrier()
        return chosen, rejected, False

    # ------------------------------------------------------------------------------ eval
    def evaluate(self, examples: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
        """Mean loss and TRL metrics (eval_ prefix) over the eval split (or the given examples)."""
        self.setup()
        examples = self.eval_examples if examples is None else examples
        return evaluate(self.net, examples, self.collate, self.loss_fn, batch_size=self.cfg.batch_size,
                        device=self.device, precision=self.cfg.precision, parallel=self.parallel)

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
        """Write OUTPUT/checkpoint-<step> (resumable) and the current weights at OUTPUT's top level.

        Several processes: every one takes part (a sharded model's weights and optimizer state are gathered,
        every process's RNG state is kept), the main process writes, and all wait until it is written.
        """
        cfg, par = self.cfg, self.parallel
        self._check_finite_weights(state.step)
        directory = os.path.join(cfg.output, f"checkpoint-{state.step}")
        saved = dict(state.to_dict(), stage=cfg.stage, seed=cfg.seed, config=cfg.to_dict(),
                     world_size=par.world_size, global_batch_size=self.global_batch_size, identity=self.identity)
        if not par.enabled and not cfg.fsdp:
            ckpt.save_checkpoint(directory, self.model, self.optimizer, self.scheduler, saved)
            ckpt.save_model_weights(self.model, cfg.output)
            return directory
        weights = optimizer_state = None
        if cfg.fsdp:
            from .fsdp import full_optimizer_state, full_trainable_state

            weights = full_trainable_state(self.model, par)
            optimizer_state = full_optimizer_state(self.model, self.optimizer)
        rng = par.gather_objects(ckpt.rng_state())
        if par.is_main:
            ckpt.save_checkpoint(directory, self.model, self.optimizer, self.scheduler, saved, weights=weights,
                                 optimizer_state=optimizer_state, rng_per_rank=rng)
            ckpt.save_model_weights(self.model, cfg.output, state_dict=weights)
        par.barrier()
        return directory

    def _check_finite_weights(self, step: int) -> None:
        """NonFiniteError when a trainable weight holds NaN / Inf: nothing non-finite is ever saved."""
        local = [p.detach() for p in self.model.parameters() if p.requires_grad]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in local]  # a sharded weight: this shard
        bad = any(not bool(torch.isfinite(t).all()) for t in local)
        if self.parallel.any(bad) if self.parallel.enabled else bad:
            raise NonFiniteError(f"weights are not finite after step {step}: the training diverged; "
                                 f"{self._nonfinite_hint()}", step=step, what="weights")

    def _nonfinite_hint(self) -> str:
        """How to avoid a diverged run, with this run's settings, and what was (not) saved."""
        cfg = self.cfg
        clip = (f"clip gradients harder (--max-grad-norm below {cfg.max_grad_norm:g})" if cfg.max_grad_norm
                else "enable gradient clipping (--max-grad-norm 1.0; it is off)")
        last = ckpt.latest_checkpoint(cfg.output) if self.parallel.is_main else None
        kept = f"the last checkpoint, {last}, is kept" if last else "no checkpoint was written before"
        return (f"lower --lr (now {cfg.learning_rate:g}) or {clip}, or pass --on-nonfinite skip to skip such steps. "
                f"Nothing was saved after the divergence; {kept}")

    def _checkpoint_identity(self, directory: str) -> Optional[Dict[str, Any]]:
        """The run identity a checkpoint records (None, with a note, for a checkpoint without one)."""
        try:
            with open(os.path.join(directory, ckpt.STATE_JSON), encoding="utf-8") as fh:
                recorded = json.load(fh).get("identity")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if not isinstance(recorded, dict):
            self.log(f"resume: {directory} records no run identity (an earlier dpo_fast wrote it); "
                     "its settings are not checked against this run's")
            return None
        return recorded

    def _check_resume(self, resume_dir: Optional[str]) -> None:
        """Refuse to continue a checkpoint (or, with none, a run record in the output folder) of another run."""
        cfg = self.cfg
        if resume_dir is not None:
            run_identity.check_same_run(self._checkpoint_identity(resume_dir), self.identity, where=resume_dir)
        if cfg.resume:  # the folder the resumed run writes into must hold that run too (or none)
            run_identity.check_same_run(run_identity.read_run_record(cfg.output), self.identity,
                                        where=f"{cfg.output} (its {run_identity.RUN_FILE})")

    def _load(self, directory: str) -> Dict[str, Any]:
        """Restore a checkpoint into this process (each process reads it; its own RNG state when saved)."""
        kwargs: Dict[str, Any] = {}
        if self.cfg.fsdp:
            from .fsdp import load_full_optimizer_state, load_full_trainable_state

            kwargs = {"load_weights": load_full_trainable_state,
                      "load_optimizer": lambda opt, sd: load_full_optimizer_state(self.model, opt, sd)}
        return ckpt.load_checkpoint(directory, self.model, self.optimizer, self.scheduler, rank=self.parallel.rank,
                                    **kwargs)

    def train(self) -> TrainResult:
        """Run the training; returns a TrainResult (also after Ctrl-C, with interrupted=True)."""
        self.setup()
        cfg, par = self.cfg, self.parallel
        state = LoopState(total_steps=self.total_steps, batches_per_epoch=self.batches_per_epoch)
        resume_dir = self._resume_dir()  # every process checks the option; the main one's choice is taken
        resume_dir = par.broadcast_object(resume_dir)
        self._main_decides(lambda: self._check_resume(resume_dir))  # before any file of the run is written
        if par.is_main:
            os.makedirs(cfg.output, exist_ok=True)
            run_identity.write_run_record(cfg.output, self.identity)
            with open(os.path.join(cfg.output, FINAL_STATE_FILE), "w", encoding="utf-8") as fh:
                json.dump(cfg.to_dict(), fh, indent=2, default=str)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(cfg.output)
        if resume_dir is not None:
            saved = self._load(resume_dir)
            if int(saved.get("world_size", 1)) != par.world_size:
                self.log(f"resume: the checkpoint was written by {saved.get('world_size', 1)} process(es), this run "
                         f"has {par.world_size}; the data position is kept, the random state is not")
            if int(saved.get("global_batch_size", self.global_batch_size)) != self.global_batch_size:
                self.log(f"resume: the checkpoint's global micro-batch was {saved['global_batch_size']} pairs, this "
                         f"run's is {self.global_batch_size}; the run continues at micro-batch {saved['micro']} of "
                         f"the new order, which is not where the checkpoint stopped")
            state.step, state.micro = int(saved["step"]), int(saved["micro"])
            if int(saved.get("total_steps", self.total_steps)) != self.total_steps:
                self.log(f"resume: the checkpoint planned {saved.get('total_steps')} steps, this run plans "
                         f"{self.total_steps}; the learning-rate schedule follows the checkpoint's")
            self.log(f"resumed from {resume_dir} at step {state.step}")
        result = TrainResult(output_dir=cfg.output, steps=state.step, interrupted=False,
                             ref_cache_hits=self.ref_cache_hits)
        resume_step = state.step if resume_dir is not None else None
        logger = (MetricsLogger(cfg.output, tensorboard=cfg.tensorboard, resume_step=resume_step) if par.is_main
                  else _RecordOnly())
        if resume_dir is None and self.eval_examples:
            result.initial_eval_metrics = self.evaluate()
            logger.log(0, result.initial_eval_metrics)
        bar = ProgressBar(self.total_steps, initial=state.step, enabled=cfg.progress and par.is_main, desc=cfg.stage)
        zero_grads = ZeroGradWatch()

        def on_step(st: LoopState, record: Dict[str, float]) -> None:
            bar.update(record)
            if st.skipped is not None:
                self.log(f"warning: step {st.step} skipped (no update): {st.skipped} (--on-nonfinite skip)")
            collapsed = zero_grads.update(st.step, record["grad_norm"])
            if collapsed is not None:
                self.log(collapsed)
            if st.step % cfg.logging_steps == 0 or st.step == st.total_steps:
                st.history.append(logger.log(st.step, record))
            if cfg.eval_steps and self.eval_examples and st.step % cfg.eval_steps == 0 and st.step < st.total_steps:
                logger.log(st.step, self.evaluate())
            if cfg.save_steps and st.step % cfg.save_steps == 0 and st.step < st.total_steps:
                self.save(st)

        try:
            with StopFlag(escalate=not par.enabled) as stop:
                run_loop(self.net, self.optimizer, self.scheduler, examples=self.train_examples,
                         collate=self.collate, order_fn=self.order_fn, loss_fn=self.loss_fn, state=state,
                         grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, device=self.device,
                         precision=cfg.precision, on_step=on_step, stop=stop, parallel=par,
                         loss_weight=self.loss_weight if cfg.stage == "sft" else None, on_nonfinite=cfg.on_nonfinite)
        except KeyboardInterrupt:
            state.interrupted = True
        except NonFiniteError as exc:
            logger.close()
            if exc.what == "weights":  # from a periodic save: its message is complete
                raise
            raise NonFiniteError(f"{exc.what} is not finite ({exc.value}) at step {exc.step}: the training diverged; "
                                 f"{self._nonfinite_hint()}", step=exc.step, what=exc.what, value=exc.value) from None
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
        if cfg.plot and par.is_main:
            result.plot_path = plot_metrics(read_metrics(logger.path), os.path.join(cfg.output, PLOT_FILE),
                                            title=run_title(cfg.stage, cfg.loss_type, cfg.beta))
        if cfg.merge and not state.interrupted:
            if par.is_main:
                result.merged_dir = ckpt.save_merged(self.model, os.path.join(cfg.output, "merged"), self.tokenizer)
            par.barrier()
        return result


def _flag_name(flag: str) -> str:
    """'--eval-data' -> 'eval_data': how errors name a data option (the TrainConfig field)."""
    return flag.lstrip("-").replace("-", "_")


def _silent(text: str) -> None:
    """The log function of the processes other than the main one."""


class _RecordOnly:
    """MetricsLogger's interface for the processes other than the main one: records, no files."""

    path: Optional[str] = None

    def log(self, step: int, metrics: Dict[str, Any]) -> Dict[str, Any]:
        return {"step": int(step), **{key: _to_float(value) for key, value in metrics.items()}}

    def close(self) -> None:
        pass


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """Run one training described by config (see DPOFastTrainer for the keyword arguments)."""
    return DPOFastTrainer(config, **kwargs).train()
