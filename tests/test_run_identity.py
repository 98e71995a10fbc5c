"""A reused output folder never mixes two runs: it is refused unless `overwrite` (cleared first) or `resume`,
and `resume` continues only a checkpoint of the same run, naming every setting that differs."""
from __future__ import annotations

import copy
import json
import os

import pytest

from dpo_fast.cli import build_parser, config_from_args
from dpo_fast.errors import UserError
from dpo_fast.train import DPOFastTrainer, TrainConfig, train
from dpo_fast.train import run_identity
from dpo_fast.train.logging import read_metrics
from seeds import fresh_seed  # noqa: E402  (tests/ is on sys.path under pytest)
from test_train import make_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def steps_logged(output):
    return [r["step"] for r in read_metrics(os.path.join(output, "metrics.jsonl")) if "loss" in r]


def listing(output):
    return sorted(os.listdir(output))


def test_a_folder_holding_another_run_is_refused_before_the_model_loads(tok, tmp_path):
    first = make_cfg(tok, tmp_path, max_steps=3)
    train(first, tokenizer=tok, log=lambda s: None)
    before = listing(first.output)
    assert "run.json" in before and "checkpoint-3" in before
    with open(os.path.join(first.output, "metrics.jsonl"), encoding="utf-8") as fh:
        metrics_before = fh.read()
    other = copy.copy(first)
    other.seed, other.max_steps = first.seed + 1, 2
    with pytest.raises(UserError, match=r"already holds a run's outputs .*--overwrite.*--resume"):
        train(other, tokenizer=tok, log=lambda s: None)
    missing_model = copy.copy(other)
    missing_model.model = str(tmp_path / "no-such-model")  # the folder is checked first: no model load
    with pytest.raises(UserError, match="already holds"):
        DPOFastTrainer(missing_model, tokenizer=tok, log=lambda s: None).setup()
    assert listing(first.output) == before  # nothing written, nothing deleted
    with open(os.path.join(first.output, "metrics.jsonl"), encoding="utf-8") as fh:
        assert fh.read() == metrics_before
    # a new or empty folder, or one holding only other files, is fine
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for name in ("new", "empty", "notes"):
        train(make_cfg(tok, tmp_path, name, max_steps=1), tokenizer=tok, log=lambda s: None)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        train(make_cfg(tok, tmp_path, "afile", max_steps=1), tokenizer=tok, log=lambda s: None)


def test_overwrite_clears_the_earlier_run_and_keeps_the_reference_cache(tok, tmp_path):
    first = make_cfg(tok, tmp_path, max_steps=4, save_steps=2, precompute_ref=True)
    train(first, tokenizer=tok, log=lambda s: None)
    (tmp_path / "run" / "mine.txt").write_text("not a run output")
    (tmp_path / "run" / "config.yaml").write_text("seed: 1\n")  # what the CLI writes beside a run (--config)
    assert {"checkpoint-2", "checkpoint-4", "ref_cache"} <= set(listing(first.output))
    second = copy.copy(first)
    second.seed, second.max_steps, second.save_steps, second.overwrite = first.seed + 1, 1, None, True
    logs = []
    trainer = DPOFastTrainer(second, tokenizer=tok, log=logs.append)
    result = trainer.train()
    assert any(line.startswith("overwrite: deleted") for line in logs)
    names = listing(first.output)
    assert "checkpoint-1" in names and "checkpoint-2" not in names and "checkpoint-4" not in names
    assert "mine.txt" in names and "ref_cache" in names and "config.yaml" not in names
    assert steps_logged(first.output) == [1] and result.steps == 1
    assert run_identity.read_run_record(first.output) == trainer.identity  # the new run's record
    with pytest.raises(ValueError, match="overwrite"):
        TrainConfig(overwrite=True, resume=True)
    # an output folder that is also an input of the run is never cleared
    as_input = copy.copy(second)
    as_input.tokenizer = second.output
    with pytest.raises(UserError, match="also an input"):
        DPOFastTrainer(as_input, tokenizer=tok, log=lambda s: None).setup()
    assert "checkpoint-1" in listing(first.output)


def test_resume_refuses_a_checkpoint_of_another_run_naming_what_differs(tok, tmp_path):
    cfg = make_cfg(tok, tmp_path, max_steps=4, save_steps=2)
    train(cfg, tokenizer=tok, log=lambda s: None)
    before = listing(cfg.output)
    with open(os.path.join(cfg.output, "metrics.jsonl"), encoding="utf-8") as fh:
        metrics_before = fh.read()
    other = copy.copy(cfg)
    other.resume, other.max_steps = True, 8
    other.seed, other.lr, other.lora_r = cfg.seed + 1, cfg.lr * 2, 8
    with pytest.raises(UserError) as err:
        train(other, tokenizer=tok, log=lambda s: None)
    message = str(err.value)
    assert "checkpoint-4 belongs to another run" in message
    assert f"seed: {cfg.seed} -> {cfg.seed + 1}" in message
    assert f"learning_rate: {cfg.lr} -> {cfg.lr * 2}" in message and "lora_r: 16 -> 8" in message
    assert "max_steps" not in message and "train_data" not in message
    assert listing(cfg.output) == before  # refused before any file was written
    with open(os.path.join(cfg.output, "metrics.jsonl"), encoding="utf-8") as fh:
        assert fh.read() == metrics_before

    def refused(**changes):
        wrong = copy.copy(cfg)
        wrong.resume = os.path.join(cfg.output, "checkpoint-2")
        for key, value in changes.items():
            setattr(wrong, key, value)
        with pytest.raises(UserError, match="belongs to another run") as err:
            train(wrong, tokenizer=tok, log=lambda s: None)
        return str(err.value)

    from dpo_fast.demo_task import make_preference_dataset

    assert "train_data:" in refused(data=make_preference_dataset(96, seed=fresh_seed()))
    assert "loss beta: 0.1 -> 0.3" in refused(beta=0.3)
    assert "average_log_prob: false -> true" in refused(average_log_prob=True)
    text = refused(max_length=48, grad_accum=2)
    assert "max_length: 64 -> 48" in text and "grad_accum: 1 -> 2" in text and "global_batch_size" not in text
    assert "global_batch_size: 8 -> 4" in refused(batch_size=4)
    assert listing(cfg.output) == before

    # what may change on resume: max_steps, logging / eval / save frequency
    same = copy.copy(cfg)
    same.resume, same.max_steps, same.logging_steps, same.save_steps = True, 6, 2, 3
    assert train(same, tokenizer=tok, log=lambda s: None).steps == 6
    assert steps_logged(cfg.output) == [1, 2, 3, 4, 6]


def test_resume_without_a_checkpoint_checks_the_run_record(tok, tmp_path):
    cfg = make_cfg(tok, tmp_path, max_steps=1)
    trainer = DPOFastTrainer(cfg, tokenizer=tok, log=lambda s: None).setup()
    os.makedirs(cfg.output)
    run_identity.write_run_record(cfg.output, dict(trainer.identity, seed=cfg.seed + 5))  # a run that saved nothing
    again = copy.copy(cfg)
    again.resume = True
    with pytest.raises(UserError, match=rf"run.json\) belongs to another run.*seed: {cfg.seed + 5} -> {cfg.seed}"):
        train(again, tokenizer=tok, log=lambda s: None)
    run_identity.write_run_record(cfg.output, trainer.identity)  # the same run: it starts from scratch
    assert train(again, tokenizer=tok, log=lambda s: None).steps == 1


def test_identity_is_recorded_in_run_json_and_checkpoints(tok, tmp_path):
    cfg = make_cfg(tok, tmp_path, max_steps=2, save_steps=1)
    trainer = DPOFastTrainer(cfg, tokenizer=tok, log=lambda s: None)
    trainer.train()
    ident = trainer.identity
    assert run_identity.read_run_record(cfg.output) == ident
    for step in (1, 2):
        with open(os.path.join(cfg.output, f"checkpoint-{step}", "trainer_state.json"), encoding="utf-8") as fh:
            assert json.load(fh)["identity"] == ident
    for key in ("model", "tokenizer", "train_data", "eval_data", "seed", "loss", "max_length", "global_batch_size",
                "grad_accum", "learning_rate", "lora_r"):
        assert key in ident, key
    for key in ("max_steps", "save_steps", "eval_steps", "logging_steps", "progress", "output"):
        assert key not in ident, key


def test_model_fingerprint_follows_the_weights_not_the_path(tmp_path):
    from dpo_fast.train.model_loading import model_fingerprint

    folder = tmp_path / "m"
    folder.mkdir()
    blob = bytearray(os.urandom(3_000_000))
    (folder / "model.safetensors").write_bytes(bytes(blob))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    fp = model_fingerprint(str(folder), None, 0)
    moved = tmp_path / "moved"
    os.rename(folder, moved)
    assert model_fingerprint(str(moved), None, 0) == fp  # moved or copied: the same weights
    blob[1_500_000:1_600_000] = os.urandom(100_000)  # a part of the weights retrained, same size
    (moved / "model.safetensors").write_bytes(bytes(blob))
    assert model_fingerprint(str(moved), None, 0) != fp


def test_cli_flags_reach_the_config():
    parser = build_parser()
    base = ["train", "--model", "m", "--data", "d", "--output", "o"]
    cfg = config_from_args(parser.parse_args(base + ["--overwrite", "--on-nonfinite", "skip"]), "dpo")
    assert cfg.overwrite and cfg.on_nonfinite == "skip"
    cfg = config_from_args(parser.parse_args(base), "dpo")
    assert not cfg.overwrite and cfg.on_nonfinite == "stop"
