"""--config run.yaml: flags from a YAML file, overridden on the command line, unknown keys, --print-config and
the effective configuration written to the output folder."""
from __future__ import annotations

import json

import pytest
import yaml

import dpo_fast.train as train_package
from dpo_fast.cli import main
from dpo_fast.demo_task import make_preference_dataset
from hf_fixtures import save_tiny_checkpoint, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_yaml(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def printed_config(argv, capsys):
    assert main([*argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# dpo-fast ")
    return yaml.safe_load(text)


def test_yaml_values_and_command_line_overrides(tmp_path, capsys):
    run = write_yaml(tmp_path / "run.yaml", """
model: org/name
data: trl-lib/ultrafeedback_binarized
data_split: train_prefs
output: out
load-in-4bit: true
lr: 1e-5            # YAML 1.1 reads this as a string; the flag's type makes it a number
max_length: 512
loss-type: [sigmoid, sft]
loss-weights: [1, 0.5]
loss_kwarg: {use_weighting: true}
target-modules: q_proj,v_proj
resume: false
""")
    cfg = printed_config(["train", "--config", run], capsys)
    assert cfg["model"] == "org/name" and cfg["data-split"] == "train_prefs" and cfg["load-in-4bit"] is True
    assert cfg["lr"] == 1e-5 and cfg["max-length"] == 512 and cfg["loss-type"] == ["sigmoid", "sft"]
    assert cfg["loss-weights"] == ["1", "0.5"] and cfg["loss-kwarg"] == {"use_weighting": True}
    assert cfg["target-modules"] == ["q_proj,v_proj"] and cfg["beta"] == 0.1 and cfg["revision"] is None

    over = printed_config(["train", "--config", run, "--max-length", "256", "--loss-type", "ipo,sft", "--data-split",
                           "test_prefs", "--lr", "2e-6"], capsys)
    assert over["max-length"] == 256 and over["loss-type"] == ["ipo,sft"] and over["loss-weights"] == ["1", "0.5"]
    assert over["data-split"] == "test_prefs" and over["lr"] == 2e-6 and over["load-in-4bit"] is True

    # what --print-config prints is a config file that gives the same configuration back
    again = write_yaml(tmp_path / "again.yaml", yaml.safe_dump(over))
    assert printed_config(["train", "--config", again], capsys) == over


@pytest.mark.parametrize("text, needles", [
    ("model: m\nwarmup_ration: 0.1\n", ["unknown key 'warmup_ration'", "did you mean 'warmup-ratio'"]),
    ("model: m\nmax-lenght: 5\n", ["unknown key 'max-lenght'", "did you mean 'max-length'"]),
    ("model: m\nzzz: 1\n", ["unknown key 'zzz'", "flags of `dpo-fast train --help`"]),
    ("model: m\nbatch-size: 2.5\n", ["batch-size: expected a number (an integer), got 2.5"]),
    ("model: m\nload-in-4bit: yes please\n", ["load-in-4bit: expected true or false"]),
    ("model: m\nscheduler: exp\n", ["scheduler: must be one of ['cosine'"]),
    ("- model\n", ["holds a YAML list; expected a mapping"]),
    ("model: [unclosed\n", ["not valid YAML"]),
])
def test_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, text, needles):
    path = write_yaml(tmp_path / "bad.yaml", text)
    assert main(["train", "--config", path, "--data", "d.jsonl", "--output", "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dpo-fast: error: --config: {path}") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert f"--config: no such file: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err


def test_required_flags_from_the_file_and_still_required_without(tmp_path, capsys):
    only_model = write_yaml(tmp_path / "m.yaml", "model: m\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", only_model])
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err


def test_run_writes_the_effective_config_to_the_output(tmp_path, capsys, monkeypatch):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", tiny_tokenizer(tmp_path))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_preference_dataset(8, seed=1)))
    out = tmp_path / "out"
    run = write_yaml(tmp_path / "run.yaml", f"model: {ckpt}\ndata: {data}\noutput: {out}\nmax-steps: 1\n"
                                            "batch-size: 4\nmax_length: 64\nno-progress: true\nno_plot: true\n"
                                            "no-tensorboard: true\ndevice: cpu\nbeta: 0.3\n")
    seen = []
    real = train_package.DPOFastTrainer

    def spy(config, **kwargs):
        seen.append(config)
        return real(config, **kwargs)

    monkeypatch.setattr(train_package, "DPOFastTrainer", spy)
    assert main(["train", "--config", run, "--beta", "0.2"]) == 0
    assert seen[0].beta == 0.2 and seen[0].max_steps == 1 and seen[0].max_length == 64 and not seen[0].progress
    capsys.readouterr()
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["beta"] == 0.2 and written["max-steps"] == 1 and written["model"] == ckpt
    assert written == printed_config(["train", "--config", run, "--beta", "0.2"], capsys)
