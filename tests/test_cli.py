"""The `dpo-fast` command line: argument parsing and tiny end-to-end runs on a JSONL file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dpo_fast.cli import build_parser, config_from_args, main
from dpo_fast.demo_task import demo_tokenizer, make_preference_dataset, tiny_llama_config
from dpo_fast.train.logging import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A local transformers checkpoint (tiny random Llama + the demo tokenizer), as users have."""
    from transformers import AutoModelForCausalLM

    tok = demo_tokenizer()
    path = tmp_path_factory.mktemp("ckpt")
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok), hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=2, num_attention_heads=2,
                                                               num_key_value_heads=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows, bad_lines=()):
    lines = [json.dumps(r) for r in rows]
    for at, text in bad_lines:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def parse(argv):
    args = build_parser().parse_args(argv)
    return config_from_args(args, "dpo" if args.command == "train" else "sft")


def test_parsing_maps_every_option():
    cfg = parse(["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--loss-type", "sigmoid,sft",
                 "--loss-type", "ipo", "--loss-weights", "1,0.5", "--loss-weights", "0.25", "--beta", "0.3",
                 "--label-smoothing", "0.1", "--ld-alpha", "0.5", "--precompute-ref", "--on-bad-row", "error",
                 "--max-length", "77", "--truncation-mode", "keep_start", "--eval-fraction", "0.1", "--seed", "3",
                 "--grad-accum", "4", "--batch-size", "2", "--max-steps", "9", "--lr", "1e-4", "--warmup-ratio",
                 "0.2", "--scheduler", "linear", "--gradient-checkpointing", "--resume", "--load-in-4bit",
                 "--lora-r", "8", "--target-modules", "q_proj,v_proj", "--loss-kwarg", "simpo_gamma=0.7",
                 "--max-grad-norm", "0"])
    assert cfg.loss_type == ["sigmoid", "sft", "ipo"] and cfg.loss_weights == [1.0, 0.5, 0.25]
    assert (cfg.beta, cfg.label_smoothing, cfg.ld_alpha) == (0.3, 0.1, 0.5)
    assert cfg.precompute_ref and cfg.on_bad_row == "error" and cfg.max_length == 77
    assert cfg.truncation_mode == "keep_start" and cfg.eval_fraction == 0.1 and cfg.seed == 3
    assert (cfg.grad_accum, cfg.batch_size, cfg.max_steps, cfg.lr) == (4, 2, 9, 1e-4)
    assert cfg.scheduler == "linear" and cfg.warmup_ratio == 0.2 and cfg.gradient_checkpointing
    assert cfg.resume is True and cfg.load_in_4bit and cfg.lora_r == 8
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.loss_kwargs == {"simpo_gamma": 0.7}
    assert cfg.max_grad_norm is None and cfg.learning_rate == 1e-4
    default = parse(["train", "--model", "m", "--data", "d", "--output", "o"])
    assert default.learning_rate == 5e-6 and default.loss_type == ["sigmoid"] and default.resume is False
    assert parse(["sft", "--model", "m", "--data", "d", "--output", "o", "--resume", "ck"]).resume == "ck"
    assert not default.offload_checkpointing and not default.gradient_checkpointing
    offload = parse(["train", "--model", "m", "--data", "d", "--output", "o", "--offload-checkpointing"])
    assert offload.offload_checkpointing and offload.gradient_checkpointing
    assert not default.prefix_sharing
    assert parse(["train", "--model", "m", "--data", "d", "--output", "o", "--prefix-sharing"]).prefix_sharing


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "m", "--data", "d", "--output", "o", "--loss-type", "nope"], "loss-type"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--loss-type", "sigmoid,ipo", "--loss-weights", "1"], "loss_weights"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--scheduler", "exp"], "scheduler"),
    (["train", "--data", "d", "--output", "o"], "--model"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--eval-fraction", "1.5"], "eval_fraction"),
])
def test_bad_arguments_exit_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("extra, needles", [
    (["--loss-kwarg", "simpo_gama=0.7"], ["unknown loss option(s) ['simpo_gama']", "'simpo_gamma'"]),
    (["--loss-kwarg", "beta=0.2"], ["'beta' has its own option", "--beta"]),
    (["--loss-kwarg", "use_weighting=yes"], ["use_weighting must be True or False"]),
    (["--loss-type", "exo_pair"], ["label_smoothing must be > 0 for loss_type 'exo_pair'"]),
    (["--ld-alpha", "0.5", "--average-log-prob"], ["ld_alpha cannot be combined"]),
    (["--f-divergence-type", "kl"], ["--f-divergence-type", "'reverse_kl'"]),
    (["--loss-type", "sigmoid,nope"], ["--loss-type: unknown loss type 'nope'; valid: ['sigmoid'"]),
])
def test_bad_loss_options_fail_before_training(extra, needles, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "m", "--data", "d", "--output", "o", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err


def test_train_end_to_end_on_jsonl_with_bad_rows(checkpoint_dir, tmp_path, capsys):
    rows = make_preference_dataset(40, seed=int(torch.randint(0, 1000, ())))
    data = write_jsonl(tmp_path / "pairs.jsonl", rows, bad_lines=[(3, json.dumps({"prompt": "x", "chosen": "a"})),
                                                                   (7, "{not json")])
    out = str(tmp_path / "out")
    code = main(["train", "--model", checkpoint_dir, "--data", data, "--output", out, "--max-steps", "3",
                 "--batch-size", "4", "--lr", "1e-3", "--eval-fraction", "0.2", "--no-progress",
                 "--no-tensorboard", "--max-length", "64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped 2" in printed and "line 4" in printed and "line 8" in printed
    train_records = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "training_curves.png"))
    # --on-bad-row error stops at the first bad row (a user error: one line, status 2)
    assert main(["train", "--model", checkpoint_dir, "--data", data, "--output", str(tmp_path / "o2"),
                 "--on-bad-row", "error", "--max-steps", "1", "--no-progress"]) == 2
    assert "line 4" in capsys.readouterr().err


def test_sft_then_train_with_adapter(checkpoint_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_preference_dataset(24, seed=5))
    sft_out, dpo_out = str(tmp_path / "sft"), str(tmp_path / "dpo")
    common = ["--model", checkpoint_dir, "--data", data, "--batch-size", "4", "--no-progress", "--no-plot",
              "--no-tensorboard", "--max-length", "64"]
    assert main(["sft", *common, "--output", sft_out, "--max-steps", "2", "--lr", "1e-2"]) == 0
    assert main(["train", *common, "--output", dpo_out, "--adapter", sft_out, "--max-steps", "2",
                 "--precompute-ref"]) == 0
    first = [r for r in read_metrics(os.path.join(dpo_out, "metrics.jsonl")) if "loss" in r][0]
    assert abs(first["loss"] - 0.6931472) < 1e-5  # policy starts equal to its frozen reference copy
    assert os.listdir(os.path.join(dpo_out, "ref_cache"))


def test_module_entry_point_and_bench_hook(monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "dpo_fast", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "dpo_fast" in proc.stdout
    import importlib.util
    import runpy

    seen = {}

    def fake_run_module(name, run_name=None, alter_sys=False):
        seen.update(name=name, argv=list(sys.argv))
        raise SystemExit(3)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(runpy, "run_module", fake_run_module)
    assert main(["bench", "--suite", "head", "-x"]) == 3  # everything after `bench` goes to the suite
    assert seen == {"name": "benchmarks", "argv": ["benchmarks", "--suite", "head", "-x"]}


def test_bench_runs_outside_the_checkout(tmp_path):
    """`dpo-fast bench` finds the suite of the source checkout it was installed from, from any directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # dpo_fast from its (editable) install
    run = subprocess.run([sys.executable, "-m", "dpo_fast", "bench", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--quick" in run.stdout


def test_cpu_thread_count_defaults_to_one_unless_the_user_chose():
    from dpo_fast.train.cpu_threads import cpu_thread_count, set_cpu_threads

    assert cpu_thread_count(None, {}) == 1
    assert cpu_thread_count(None, {"OMP_NUM_THREADS": "4"}) is None  # the user's environment wins
    assert cpu_thread_count(None, {"MKL_NUM_THREADS": "2"}) is None and cpu_thread_count(None, {"OMP_NUM_THREADS": ""}) == 1
    assert cpu_thread_count(3, {"OMP_NUM_THREADS": "4"}) == 3  # --threads wins over everything
    for bad in (0, -2):
        with pytest.raises(ValueError, match="--threads"):
            cpu_thread_count(bad, {})
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert set_cpu_threads("cuda:0", None, {}) is None and torch.get_num_threads() == 2  # not a CPU run
        assert set_cpu_threads("cpu", None, {"OMP_NUM_THREADS": "2"}) is None and torch.get_num_threads() == 2
        assert set_cpu_threads("cpu", None, {}) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("env, flag, during", [({}, [], 1), ({"OMP_NUM_THREADS": "2"}, [], 2), ({}, ["--threads", "2"], 2)])
def test_train_command_pins_cpu_threads_and_restores_them(monkeypatch, tmp_path, checkpoint_dir, env, flag, during):
    import dpo_fast.train as train_package
    from dpo_fast.train.trainer import TrainResult
    from dpo_fast.train.distributed import Parallel

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    seen = []

    class FakeTrainer:  # the command's own steps around the run, without the run
        def __init__(self, config):
            self.config, self.parallel = config, Parallel()

        def setup(self):
            return self

        def train(self):
            seen.append(torch.get_num_threads())
            return TrainResult(output_dir=self.config.output, steps=0, interrupted=False)

    monkeypatch.setattr(train_package, "DPOFastTrainer", FakeTrainer)
    data = write_jsonl(tmp_path / "d.jsonl", make_preference_dataset(4, seed=0))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["train", "--model", checkpoint_dir, "--data", data, "--output", str(tmp_path / "o"),
                     "--device", "cpu", *flag]) == 0
        assert seen == [during] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
