"""The `dpo-fast` command line: `train` (DPO), `sft`, `demo` and `bench`.

    dpo-fast train --model CKPT_DIR --data pairs.jsonl --output out/ [--load-in-4bit] [options]
    dpo-fast train --model org/name --data org/dataset --data-split train_prefs --output out/
    dpo-fast train --config run.yaml [--flag value ...]   (command-line flags override the file)
    dpo-fast sft   --model CKPT_DIR --data pairs.jsonl --output sft_out/
    dpo-fast train --model CKPT_DIR --adapter sft_out/ --data pairs.jsonl --output dpo_out/
    dpo-fast demo
    dpo-fast bench [benchmark arguments]        (runs `python -m benchmarks ...`)
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from dpo_fast import __version__, config_file
from dpo_fast.errors import UserError
from dpo_fast.data import ON_BAD_ROW, TRUNCATION_MODES
from dpo_fast.loss_types import F_DIVERGENCE_TYPES, as_loss_types
from dpo_fast.train.config import DEFAULT_LR, ON_NONFINITE, OPTIMIZERS, PRECISIONS, SCHEDULERS, TrainConfig


def _csv_list(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """Flatten repeatable, comma-separated values: ['a,b', 'c'] -> ['a', 'b', 'c']."""
    if not values:
        return None
    return [v.strip() for item in values for v in str(item).split(",") if v.strip()]


def _float_list(values: Optional[Sequence[str]], flag: str) -> Optional[List[float]]:
    items = _csv_list(values)
    if items is None:
        return None
    try:
        return [float(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected numbers, got {items}") from None


def _kwarg(text: str) -> tuple:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--loss-kwarg: expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def add_train_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    """Every TrainConfig option as a flag."""
    d = TrainConfig(stage=stage)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="Hugging Face Hub model id (org/name; downloaded, or read from the cache offline), a local "
                        "transformers checkpoint dir, or a config (JSON file / dir with config.json) for a "
                        "random-init model")
    g.add_argument("--revision", default=None,
                   help="branch, tag or commit of a Hub --model id (and of its tokenizer)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run modelling code shipped in the model's repository (off by default)")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir or Hub id (default: the model's)")
    g.add_argument("--load-in-4bit", action="store_true", help="nf4 weights, bf16 compute (QLoRA)")
    g.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA")
    g.add_argument("--lora-r", type=int, default=d.lora_r)
    g.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    g.add_argument("--target-modules", action="append", default=None,
                   help="LoRA target modules (repeatable or comma list; default: every linear layer of the blocks)")
    g.add_argument("--adapter", default=None,
                   help="continue this LoRA adapter (a folder, e.g. from `dpo-fast sft`, or a Hub id); its starting "
                        "weights become the frozen 'ref' adapter")
    g.add_argument("--no-patch", action="store_true", help="do not patch the model with dpo_fast")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--device", default=d.device,
                   help="auto: cuda when available, else cpu; under torchrun each process takes cuda:LOCAL_RANK")
    g.add_argument("--fsdp", action="store_true",
                   help="several processes (torchrun / accelerate launch): shard the model over them (FSDP2) "
                        "instead of one replica each; LoRA only (4-bit bases included)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads of a CPU run (default 1, unless OMP_NUM_THREADS is set: small models run "
                        "fastest on one thread and a busy core slows several threads down many times over)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--offload-checkpointing", action="store_true",
                   help="gradient checkpointing with the saved layer inputs offloaded to pinned CPU memory "
                        "(Unsloth-style; implies --gradient-checkpointing; less GPU memory at about the same speed)")
    g.add_argument("--prefix-sharing", action="store_true",
                   help="run each pair as one row [prompt | chosen | rejected] so the prompt is computed once "
                        "(same loss; fewer tokens, the more so the longer the prompts)")

    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="Hub dataset id (org/name, via datasets.load_dataset), JSONL, JSON, Parquet, a `datasets` "
                        "dataset saved on disk, or a folder laid out like a dataset repository")
    g.add_argument("--data-split", default=None,
                   help="split of a Hub dataset or dataset folder, e.g. train_prefs (default: train)")
    g.add_argument("--data-config", default=None, help="configuration (subset) name of a Hub dataset")
    g.add_argument("--data-revision", default=None, help="branch, tag or commit of a Hub dataset id")
    g.add_argument("--eval-data", default=None,
                   help="a separate eval set (any --data form); instead of --eval-fraction")
    g.add_argument("--eval-split", default=None,
                   help="split of --eval-data, or alone another split of --data, e.g. test_prefs; instead of "
                        "--eval-fraction")
    g.add_argument("--prompt-column", default=None,
                   help="column holding the prompt (default: prompt, else question; see dpo_fast.schemas)")
    g.add_argument("--chosen-column", default=None, help="column holding the chosen answer (default: chosen)")
    g.add_argument("--rejected-column", default=None, help="column holding the rejected answer (default: rejected)")
    g.add_argument("--system-column", default=None,
                   help="column holding a system prompt (default: system, when the data has it)")
    g.add_argument("--max-length", type=int, default=d.max_length)
    g.add_argument("--max-prompt-length", type=int, default=None)
    g.add_argument("--truncation-mode", choices=TRUNCATION_MODES, default=d.truncation_mode)
    g.add_argument("--on-bad-row", choices=ON_BAD_ROW, default=d.on_bad_row)
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="hold out this fraction of --data for evaluation (or give --eval-data / --eval-split)")
    g.add_argument("--no-group-by-length", action="store_true", help="plain shuffled batches")

    if stage == "dpo":
        g = p.add_argument_group("loss")
        g.add_argument("--loss-type", action="append", default=None,
                       help="loss type(s) of dpo_fast.LOSS_TYPES (repeatable or comma list; default sigmoid)")
        g.add_argument("--loss-weights", action="append", default=None, help="one weight per loss type")
        g.add_argument("--beta", type=float, default=d.beta)
        g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
        g.add_argument("--reference-free", action="store_true")
        g.add_argument("--ld-alpha", type=float, default=None, help="LD-DPO length weight in [0, 1]")
        g.add_argument("--average-log-prob", action="store_true")
        g.add_argument("--f-divergence-type", choices=F_DIVERGENCE_TYPES, default=None)
        g.add_argument("--simpo-gamma", type=float, default=None)
        g.add_argument("--loss-kwarg", action="append", type=_kwarg, default=[], metavar="KEY=VALUE",
                       help="any further loss option of dpo_fast.loss_options.LossOptions, e.g. use_weighting=true "
                            "(repeatable; VALUE is read as JSON, else as a string)")
        g.add_argument("--precompute-ref", action="store_true",
                       help="compute reference log-probs once, cached in OUTPUT/ref_cache")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR[stage]:g})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="auto: bitsandbytes paged 8-bit AdamW on CUDA, else AdamW")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    g.add_argument("--on-nonfinite", choices=ON_NONFINITE, default=d.on_nonfinite,
                   help="a step whose loss or gradient norm is NaN/Inf (a diverged run): stop with an error, "
                        "saving nothing non-finite (default), or skip its update")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--seed", type=int, default=d.seed)

    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="output directory")
    g.add_argument("--logging-steps", type=int, default=d.logging_steps)
    g.add_argument("--eval-steps", type=int, default=None)
    g.add_argument("--save-steps", type=int, default=None)
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint in OUTPUT (or the given checkpoint dir); only a "
                        "checkpoint of the same run (data, model, seed, loss and optimizer settings) is continued")
    g.add_argument("--overwrite", action="store_true",
                   help="OUTPUT holds an earlier run's outputs: delete them (checkpoints, metrics, adapter; "
                        "not ref_cache/) and start a new run; without it such a folder is refused")
    g.add_argument("--merge", action="store_true", help="also write merged weights to OUTPUT/merged")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-tensorboard", action="store_true")

    config_file.add_config_arguments(p)


def config_from_args(args: argparse.Namespace, stage: str) -> TrainConfig:
    """The TrainConfig a parsed `train` / `sft` command line describes."""
    fields: Dict[str, Any] = dict(
        model=args.model, tokenizer=args.tokenizer, data=args.data, output=args.output, stage=stage,
        revision=args.revision, trust_remote_code=args.trust_remote_code, data_split=args.data_split,
        data_config=args.data_config, data_revision=args.data_revision, eval_data=args.eval_data,
        eval_split=args.eval_split, prompt_column=args.prompt_column, chosen_column=args.chosen_column,
        rejected_column=args.rejected_column, system_column=args.system_column,
        load_in_4bit=args.load_in_4bit, use_lora=not args.full_finetune, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=_csv_list(args.target_modules),
        adapter=args.adapter, patch=not args.no_patch, precision=args.precision, device=args.device,
        fsdp=args.fsdp,
        gradient_checkpointing=args.gradient_checkpointing, offload_checkpointing=args.offload_checkpointing,
        prefix_sharing=getattr(args, "prefix_sharing", False),
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode,
        on_bad_row=args.on_bad_row, eval_fraction=args.eval_fraction,
        group_by_length=not args.no_group_by_length, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, scheduler=args.scheduler,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
        on_nonfinite=args.on_nonfinite, overwrite=args.overwrite,
        batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
        seed=args.seed, logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
        resume=args.resume, merge=args.merge, progress=not args.no_progress, plot=not args.no_plot,
        tensorboard=not args.no_tensorboard,
    )
    if stage == "dpo":
        loss_kwargs = dict(args.loss_kwarg)
        if args.f_divergence_type is not None:
            loss_kwargs["f_divergence_type"] = args.f_divergence_type
        if args.simpo_gamma is not None:
            loss_kwargs["simpo_gamma"] = args.simpo_gamma
        fields.update(
            loss_type=_csv_list(args.loss_type) or ["sigmoid"],
            loss_weights=_float_list(args.loss_weights, "--loss-weights"), beta=args.beta,
            label_smoothing=args.label_smoothing, reference_free=args.reference_free, ld_alpha=args.ld_alpha,
            average_log_prob=args.average_log_prob, loss_kwargs=loss_kwargs, precompute_ref=args.precompute_ref,
        )
        as_loss_types(fields["loss_type"], name="--loss-type")  # the error names the flag, not the field
    return TrainConfig(**fields)


DEBUG_HELP = "show the Python traceback of an error (a user mistake prints one line without it)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-fast", description="Fast, memory-lean DPO for (Q)LoRA Llama models.")
    parser.add_argument("--version", action="version", version=f"dpo_fast {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="{train,sft,demo,bench}")
    sub.required = True
    # --debug after the command too; SUPPRESS keeps a subcommand's default from hiding `dpo-fast --debug train`
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    parser.command_parsers = {
        "train": sub.add_parser("train", help="DPO training of a Hub model or local checkpoint", parents=[debug]),
        "sft": sub.add_parser("sft", help="SFT on the chosen completions (the stage DPO assumes)", parents=[debug]),
    }
    add_train_arguments(parser.command_parsers["train"], "dpo")
    add_train_arguments(parser.command_parsers["sft"], "sft")
    from dpo_fast.demo import add_arguments as add_demo_arguments

    add_demo_arguments(sub.add_parser("demo", help="built-in demo: SFT then DPO of a tiny Llama on the CPU",
                                      parents=[debug]))
    bench = sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks ...)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def run_bench(bench_args: Sequence[str]) -> int:
    """`dpo-fast bench ARGS` == `python -m benchmarks ARGS` (hook for the benchmark suite)."""
    import importlib.util
    import runpy

    checkout = Path(__file__).resolve().parent.parent  # a source checkout (editable install) holds benchmarks/
    if importlib.util.find_spec("benchmarks") is None and (checkout / "benchmarks" / "__main__.py").is_file():
        sys.path.insert(0, str(checkout))
    if importlib.util.find_spec("benchmarks") is None:
        print("dpo-fast bench: the benchmark suite (package `benchmarks`) is not importable here; "
              "run it from a source checkout", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["benchmarks", *bench_args]
    try:
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = saved
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `dpo-fast` console script; returns the exit status.

    A user mistake (`dpo_fast.errors.UserError`) prints one line, ``dpo-fast: error: ...``, and returns 2
    (argparse's status for a bad command line); with --debug it raises, traceback and all. Any other
    exception is an internal error and propagates.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # forward everything, including --help, to the suite
        return run_bench(argv[1:])
    parser = build_parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    file_lists: Dict[str, List[Any]] = {}
    yaml_path = config_file.config_path(argv) if command in ("train", "sft") else None
    if yaml_path is not None:  # the file's values become the flags' defaults: the command line overrides them
        try:
            file_lists = config_file.apply_config(parser.command_parsers[command], config_file.read_yaml(yaml_path),
                                                  yaml_path)
        except UserError as exc:
            if "--debug" in argv:
                raise
            return _user_error(parser, exc)
    args = parser.parse_args(argv)
    try:
        config_file.fill_lists(args, file_lists)
        return _run(parser, args, argv)
    except UserError as exc:
        if getattr(args, "debug", False):
            raise
        return _user_error(parser, exc)


def _user_error(parser: argparse.ArgumentParser, exc: UserError) -> int:
    """Print a user mistake as one line, ``dpo-fast: error: ...``; argparse's status for a bad command line."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def _explicit_loss_options(args: argparse.Namespace) -> List[str]:
    """The loss options the command line set by name (each must be read by one of the loss types)."""
    names = [key for key, _ in getattr(args, "loss_kwarg", [])]
    if getattr(args, "simpo_gamma", None) is not None:
        names.append("simpo_gamma")
    return names


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the parsed command (main() turns a UserError into one line)."""
    if args.command in ("train", "sft"):
        stage = "dpo" if args.command == "train" else "sft"
        effective = config_file.effective_config(parser.command_parsers[args.command], args)
        import torch

        from dpo_fast.train.cpu_threads import set_cpu_threads

        threads = torch.get_num_threads()
        try:
            config = config_from_args(args, stage)
            if args.print_config:
                print(config_file.to_yaml(effective, args.command), end="")
                return 0
            set_cpu_threads(config.device, args.threads)
        except UserError:
            raise
        except ValueError as exc:
            parser.error(str(exc))
        from dpo_fast.train.preflight import check_before_loading

        check_before_loading(config, explicit_loss_options=_explicit_loss_options(args))  # before any loading
        from dpo_fast.train import DPOFastTrainer
        from dpo_fast.train.distributed import shutdown

        trainer = DPOFastTrainer(config)
        try:
            trainer.setup()  # model and data first: a run that cannot start leaves no output folder behind
            if trainer.parallel.is_main:
                config_file.write_config(effective, args.command, config.output)
            result = trainer.train()
        finally:
            torch.set_num_threads(threads)  # main() may run inside a longer-lived process (tests, notebooks)
        parallel = trainer.parallel
        del trainer  # the DDP / FSDP model holds the process group: free it before the group is destroyed
        gc.collect()
        shutdown(parallel)
        if not parallel.is_main:  # the main process reports for all
            return 130 if result.interrupted else 0
        summary = {k: v for k, v in {**result.train_metrics, **result.eval_metrics}.items()
                   if k in ("step", "loss", "rewards/accuracies", "rewards/margins", "eval_loss",
                            "eval_rewards/accuracies", "eval_rewards/margins")}
        print(f"{stage}: {result.steps} steps -> {result.output_dir} (checkpoint {result.checkpoint_dir}); "
              + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
        if result.plot_path:
            print(f"plot: {result.plot_path}")
        return 130 if result.interrupted else 0
    if args.command == "demo":
        from dpo_fast.demo import run_demo, settings_from_args

        run_demo(settings_from_args(args), command=" ".join(["dpo-fast"] + [shlex.quote(a) for a in argv]))
        return 0
    if args.command == "bench":
        return run_bench(args.bench_args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
