"""Every option of the trainer in one dataclass, with defaults and validation.

The CLI maps its flags one-to-one onto these fields; the Python API takes the dataclass.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from dpo_fast.data import ON_BAD_ROW, TRUNCATION_MODES
from dpo_fast.loss_options import LossOptions

STAGES = ("dpo", "sft")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = ("auto", "adamw", "paged_adamw_8bit", "adamw_8bit")
PRECISIONS = ("auto", "fp32", "bf16")
#: what a step whose loss or gradient norm is NaN / Inf does: stop the run (nothing non-finite saved) or skip it
ON_NONFINITE = ("stop", "skip")

#: Default learning rates per stage: 5e-6 for DPO (Unsloth's recommendation), 2e-4 for SFT LoRA.
DEFAULT_LR = {"dpo": 5e-6, "sft": 2e-4}


@dataclass
class TrainConfig:
    """Options of a `dpo-fast train` / `dpo-fast sft` run (see `dpo-fast train --help`)."""

    # --- what to train, where to write ------------------------------------------------------
    # checkpoint dir, Hub model id (org/name), config JSON file/dir, a PretrainedConfig, or None (model passed in)
    model: Any = None
    # JSONL/JSON/Parquet file, saved `datasets` dir, a dataset repo folder, a Hub dataset id, or a list of row dicts
    data: Any = None
    output: str = "dpo_fast_output"
    tokenizer: Optional[str] = None  # folder or Hub id; defaults to the model's
    stage: str = "dpo"

    # --- model loading ------------------------------------------------------------------------
    load_in_4bit: bool = False
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Optional[List[str]] = None  # None: every linear layer of the decoder blocks
    adapter: Optional[str] = None  # continue an existing LoRA adapter, folder or Hub id (frozen "ref" copy as reference)
    revision: Optional[str] = None  # branch, tag or commit of a Hub model id (and of its tokenizer)
    trust_remote_code: bool = False  # let transformers run a repository's own modelling code
    patch: bool = True  # patch the model with dpo_fast (fused head, kernels)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # several processes (torchrun / accelerate launch): each takes cuda:LOCAL_RANK
    # several processes: shard the model over them with FSDP2 (each decoder layer and the rest), instead of
    # one replica per process (DDP); LoRA only (4-bit bases included); see docs/multi-gpu.md
    fsdp: bool = False
    gradient_checkpointing: bool = False
    # gradient checkpointing that keeps each decoder layer's input in pinned CPU memory until the backward
    # copies it back, the copies overlapping compute (dpo_fast.ops.offload_checkpoint, Unsloth's "smart"
    # checkpointing); implies gradient_checkpointing and needs patch.
    offload_checkpointing: bool = False
    # run each pair as one row [prompt | chosen | rejected]: the prompt goes through the model once
    # (dpo_fast.prefix_sharing; same loss and gradients); needs patch and right-padded batches.
    prefix_sharing: bool = False

    # --- data ---------------------------------------------------------------------------------
    max_length: int = 1024
    max_prompt_length: Optional[int] = None
    truncation_mode: str = "keep_end"
    on_bad_row: str = "skip"
    eval_fraction: float = 0.0
    group_by_length: bool = True
    data_split: Optional[str] = None  # split of a Hub dataset / dataset folder (default: "train" or the only one)
    data_config: Optional[str] = None  # configuration (subset) name of a Hub dataset
    data_revision: Optional[str] = None  # branch, tag or commit of a Hub dataset id
    # a separate eval set (file, folder or Hub id); eval_split alone takes another split of `data`
    eval_data: Any = None
    eval_split: Optional[str] = None
    # column names of the dataset's schema (None: recognised from the columns, dpo_fast.schemas)
    prompt_column: Optional[str] = None
    chosen_column: Optional[str] = None
    rejected_column: Optional[str] = None
    system_column: Optional[str] = None

    # --- loss ---------------------------------------------------------------------------------
    loss_type: List[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: Optional[List[float]] = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    ld_alpha: Optional[float] = None
    average_log_prob: bool = False
    # the other LossOptions fields (f_divergence_type, f_alpha_divergence_coef, discopop_tau, simpo_gamma,
    # use_weighting), checked with the rest when the config is made
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    precompute_ref: bool = False

    # --- optimisation -------------------------------------------------------------------------
    lr: Optional[float] = None  # None: DEFAULT_LR[stage]
    optimizer: str = "auto"  # auto: paged 8-bit AdamW on CUDA when bitsandbytes is there, else AdamW
    weight_decay: float = 0.0
    adam_betas: Sequence[float] = (0.9, 0.999)
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"
    max_grad_norm: Optional[float] = 1.0
    on_nonfinite: str = "stop"  # a NaN / Inf loss or gradient norm: "stop" with an error, or "skip" the update
    batch_size: int = 2  # preference pairs per micro-batch
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    seed: int = 42

    # --- logging, eval, checkpoints -------------------------------------------------------------
    logging_steps: int = 1
    eval_steps: Optional[int] = None  # None: evaluate at the end only
    save_steps: Optional[int] = None  # None: checkpoint at the end only
    resume: Union[bool, str] = False  # True: latest checkpoint in output; str: that checkpoint
    overwrite: bool = False  # delete the outputs of an earlier run in `output` first (else such a folder is refused)
    merge: bool = False
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [t.strip() for t in self.loss_type.split(",") if t.strip()]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None:
            if isinstance(self.loss_weights, str):
                self.loss_weights = [float(w) for w in self.loss_weights.split(",") if w.strip()]
            self.loss_weights = [float(w) for w in self.loss_weights]
        if self.offload_checkpointing:
            self.gradient_checkpointing = True
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        _choice("stage", self.stage, STAGES)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        _choice("on_bad_row", self.on_bad_row, ON_BAD_ROW)
        _choice("precision", self.precision, PRECISIONS)
        _choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        if self.overwrite and self.resume:
            raise ValueError("overwrite: it deletes the outputs that resume would continue; pass one of them")
        self.build_loss_options()
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "logging_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name}: must be >= 1 or None, got {value}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length: must be smaller than max_length")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction > 0 and (self.eval_data is not None or self.eval_split is not None):
            raise ValueError("eval_fraction: give one eval set: a fraction held out of the training data "
                             "(--eval-fraction) or a separate one (--eval-data / --eval-split), not both")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio: must be in [0, 1], got {self.warmup_ratio}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ValueError(f"epochs: must be > 0 when max_steps is not set, got {self.epochs}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: must be > 0 or None, got {self.max_grad_norm}")
        if self.fsdp and not self.use_lora:
            raise ValueError("fsdp: sharding is implemented for LoRA training (4-bit or not); a full fine-tune "
                             "trains on several processes without --fsdp (one replica each)")
        if self.fsdp and self.merge:
            raise ValueError("merge: a sharded (--fsdp) run writes the adapter only; merge it afterwards in one "
                             "process (dpo-fast's merge needs the whole base model in memory)")
        if self.merge and self.load_in_4bit:
            raise ValueError("merge: merged weights can only be written for non-quantized bases")
        if self.adapter is not None and not self.use_lora:
            raise ValueError("adapter: continuing an adapter needs use_lora=True")
        if self.offload_checkpointing and not self.patch:
            raise ValueError("offload_checkpointing: it is part of the dpo_fast patch; it needs patch=True")
        if self.prefix_sharing and not self.patch:
            raise ValueError("prefix_sharing: it is part of the dpo_fast patch; it needs patch=True")
        if self.prefix_sharing and self.stage == "sft":
            raise ValueError("prefix_sharing: only meaningful for the dpo stage (SFT rows have no pairs)")
        if self.precompute_ref and self.stage == "sft":
            raise ValueError("precompute_ref: only meaningful for the dpo stage")

    @property
    def learning_rate(self) -> float:
        """The effective learning rate (stage default when `lr` is None)."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.stage]

    def build_loss_options(self) -> LossOptions:
        """The checked loss options: the loss fields plus `loss_kwargs`; ValueError names a bad one."""
        if not isinstance(self.loss_kwargs, dict):
            raise ValueError(f"loss_kwargs: must be a dict of loss options, got {type(self.loss_kwargs).__name__}")
        for key in self.loss_kwargs:
            if key in LOSS_FIELDS:
                raise ValueError(f"loss_kwargs: {key!r} has its own option; set TrainConfig.{key} "
                                 f"(--{key.replace('_', '-')}) instead")
        fields = {name: getattr(self, name) for name in LOSS_FIELDS}
        try:
            return LossOptions.from_kwargs(**fields, **self.loss_kwargs)
        except TypeError as exc:  # a value of the wrong kind is a bad option of this configuration too
            raise ValueError(str(exc)) from None

    def loss_options(self) -> Dict[str, Any]:
        """Keyword arguments for dpo_fast.compute_dpo_loss: every loss option (`build_loss_options`)."""
        return self.build_loss_options().as_kwargs()

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly view (saved next to the checkpoints)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("data", "eval_data") and not isinstance(value, (str, type(None))):
                value = f"<{type(value).__name__}>"
            elif f.name == "model" and not isinstance(value, (str, type(None))):
                value = value.to_dict() if hasattr(value, "to_dict") else f"<{type(value).__name__}>"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        json.dumps(out, default=str)
        return out


#: The LossOptions fields that are TrainConfig fields too; `loss_kwargs` holds the other ones.
LOSS_FIELDS = tuple(name for name in LossOptions.names() if name in {f.name for f in dataclasses.fields(TrainConfig)})


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {list(allowed)}, got {value!r}")
