"""User mistakes on the command line: one line `dpo-fast: error: ...`, exit status 2, no traceback, and
found before the model loads (the loader is replaced by one that fails if called)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dpo_fast.cli import main
from dpo_fast.demo_task import demo_tokenizer, make_preference_dataset, tiny_llama_config
from dpo_fast.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama checkpoint, a tiny GPT-2 checkpoint, and data files good and bad."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("cli_errors")
    tok = demo_tokenizer()
    llama = root / "llama"
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tok), **SMALL)).save_pretrained(llama)
    tok.save_pretrained(llama)
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    rows = make_preference_dataset(12, seed=3)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "a"}) + "\n"
                                    + json.dumps(rows[1]) + "\n", encoding="utf-8")
    (root / "empty.jsonl").write_text("", encoding="utf-8")
    (root / "allbad.jsonl").write_text("{not json\n" + json.dumps({"prompt": "x"}) + "\n", encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [r["prompt"] for r in rows], "good": [r["chosen"] for r in rows],
                             "bad": [r["rejected"] for r in rows]}), str(root / "wrong.parquet"))
    (root / "folder").mkdir()
    (root / "folder" / "notes.txt").write_text("x")
    (root / "a_file").write_text("x")
    (root / "config.json").write_text(json.dumps(tiny_llama_config(len(tok), **SMALL).to_dict()))
    return {name: str(root / name) for name in ("llama", "gpt2", "pairs.jsonl", "bad.jsonl", "empty.jsonl",
                                                 "allbad.jsonl", "wrong.parquet", "folder", "a_file", "config.json")
            } | {"root": str(root)}


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model load fail loudly: a user error must be found before it."""
    import dpo_fast.train.model_loading as model_loading
    import dpo_fast.train.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(trainer, "load_model", refuse)
    monkeypatch.setattr(model_loading, "load_base_model", refuse)


def unwritable_dir(tmp_path):
    """A folder this process cannot create anything in (root writes through mode bits: use /sys then)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if os.access("/sys", os.F_OK) and not _can_write("/sys"):
            return "/sys/dpo_fast_out"
        pytest.skip("running as root without a read-only folder to try")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return str(locked / "out")


def _can_write(path):
    try:
        os.rmdir(__import__("tempfile").mkdtemp(dir=path))
        return True
    except OSError:
        return False


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code, err, needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dpo-fast: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def base_args(files, tmp_path, **override):
    args = {"--model": files["llama"], "--data": files["pairs.jsonl"], "--output": str(tmp_path / "out")}
    args.update(override)
    out = ["train"]
    for key, value in args.items():
        out += [key, value]
    return out + ["--max-steps", "1", "--no-progress", "--no-plot", "--no-tensorboard", "--max-length", "64"]


# (flag overrides, extra flags, what the one line must name)
CASES = {
    "bad row under --on-bad-row error": ({"--data": "bad.jsonl"}, ["--on-bad-row", "error"],
                                         ["bad.jsonl", "line 2", "missing key 'rejected'", "--on-bad-row skip"]),
    "empty data file": ({"--data": "empty.jsonl"}, [], ["empty.jsonl", "holds no rows"]),
    "only bad rows": ({"--data": "allbad.jsonl"}, [], ["allbad.jsonl", "none of the 2 rows", "line 1"]),
    "parquet with wrong columns": ({"--data": "wrong.parquet"}, [],
                                   ["wrong.parquet", "missing key 'chosen'", "'question'", "'prompt'"]),
    "folder as --data": ({"--data": "folder"}, [], ["--data", "folder", "save_to_disk"]),
    "missing --data": ({"--data": "nope.jsonl"}, [], ["--data", "nope.jsonl", "no such file"]),
    "missing --model": ({"--model": "no_model"}, [], ["--model", "no_model", "does not exist"]),
    "config without --tokenizer": ({"--model": "config.json"}, [], ["--model", "config.json", "--tokenizer"]),
    "missing --adapter": ({}, ["--adapter", "@/no_adapter"], ["--adapter", "no_adapter", "no such folder"]),
    "--resume of a missing checkpoint": ({}, ["--resume", "@/checkpoint-9"], ["--resume", "checkpoint-9"]),
    "--output that is a file": ({"--output": "a_file"}, [], ["--output", "a_file", "is a file"]),
    "loss option no loss type reads": ({}, ["--loss-kwarg", "discopop_tau=0.1"],
                                       ["--loss-kwarg", "discopop_tau", "'discopop'", "['sigmoid']"]),
    "--simpo-gamma without simpo": ({}, ["--simpo-gamma", "0.3"], ["simpo_gamma", "'simpo'"]),
}


def _path(files, value):
    if value.startswith("@/"):
        return os.path.join(files["root"], value[2:])
    return files.get(value, os.path.join(files["root"], value))


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_before_the_model_loads(case, files, tmp_path, capsys, no_model_load):
    override, extra, needles = CASES[case]
    argv = base_args(files, tmp_path, **{k: _path(files, v) for k, v in override.items()})
    argv += [_path(files, v) if v.startswith("@/") else v for v in extra]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, needles)
    assert not os.path.exists(tmp_path / "out")  # nothing written for a run that never started


def test_unknown_loss_kwarg_fails_before_the_model_loads(files, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit) as exc:  # a bad flag value: argparse's exit, usage line then the error
        main(base_args(files, tmp_path) + ["--loss-kwarg", "simpo_gama=0.7"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert_one_line_error(2, err, ["unknown loss option(s) ['simpo_gama']", "'simpo_gamma'"])


def test_unwritable_output_folder(files, tmp_path, capsys, no_model_load):
    out = unwritable_dir(tmp_path)
    code, err = run_cli(base_args(files, tmp_path, **{"--output": out}), capsys)
    assert_one_line_error(code, err, ["--output", out, "cannot write"])


def test_device_cuda_without_cuda(files, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli(base_args(files, tmp_path) + ["--device", "cuda"], capsys)
    assert_one_line_error(code, err, ["--device cuda", "CUDA is not available", "--device cpu"])


@pytest.mark.parametrize("no_patch", [[], ["--no-patch"]])
def test_unsupported_model_names_architecture_and_supported_ones_first(files, tmp_path, capsys, no_model_load,
                                                                        no_patch):
    from dpo_fast.families import FAMILIES

    code, err = run_cli(base_args(files, tmp_path, **{"--model": files["gpt2"]}) + no_patch, capsys)
    needles = ["GPT2LMHeadModel", "'gpt2'", "--no-patch too"] + [f.causal_lm for f in FAMILIES]
    assert_one_line_error(code, err, needles)
    assert "target_modules" not in err


def test_unsupported_model_fails_the_support_check_before_lora_in_the_python_api(files, tmp_path):
    """A model given in memory (no config file to read) meets the support check before LoRA's target search."""
    from transformers import AutoModelForCausalLM

    from dpo_fast.patching.support import UnsupportedModelError
    from dpo_fast.train import TrainConfig
    from dpo_fast.train.model_loading import load_model

    gpt2 = AutoModelForCausalLM.from_pretrained(files["gpt2"])
    for patch in (True, False):
        cfg = TrainConfig(model=None, data=files["pairs.jsonl"], output=str(tmp_path / "o"), patch=patch)
        with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
            load_model(cfg, model=gpt2, tokenizer=demo_tokenizer())


def test_debug_shows_the_traceback(files, tmp_path, no_model_load):
    with pytest.raises(UserError, match="nope.jsonl"):
        main(base_args(files, tmp_path, **{"--data": os.path.join(files["root"], "nope.jsonl")}) + ["--debug"])
    with pytest.raises(UserError, match="nope.jsonl"):  # before the command too
        main(["--debug"] + base_args(files, tmp_path, **{"--data": os.path.join(files["root"], "nope.jsonl")}))


def test_internal_errors_keep_their_traceback(files, tmp_path, monkeypatch):
    import dpo_fast.train.trainer as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("deep internal failure")

    monkeypatch.setattr(trainer, "load_model", broken)
    with pytest.raises(RuntimeError, match="deep internal failure"):
        main(base_args(files, tmp_path))


def test_console_command_prints_one_line_and_exits_2(files, tmp_path):
    """The real process: status 2 and one stderr line, no traceback (nothing loads, so this is quick)."""
    argv = base_args(files, tmp_path, **{"--model": os.path.join(files["root"], "no_model")})
    proc = subprocess.run([sys.executable, "-m", "dpo_fast", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, ["--model", "does not exist"])
    proc = subprocess.run([sys.executable, "-m", "dpo_fast", *argv, "--debug"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UserError" in proc.stderr


@pytest.mark.parametrize("option, values", [("simpo_gamma", (0.2, 1.3)), ("discopop_tau", (0.05, 0.7))])
def test_loss_type_options_table_says_who_reads_an_option(option, values):
    """LossSpec.options is true: changing the option changes a type's loss exactly when the table lists it."""
    from dpo_fast.loss_types import LOSSES
    from dpo_fast.losses import dpo_loss

    g = torch.Generator().manual_seed(0)
    logps = [-(torch.rand(6, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]
    lengths = torch.randint(1, 30, (2, 6), generator=g).double()
    for name, spec in LOSSES.items():
        extra = {"label_smoothing": 1e-3} if name == "exo_pair" else {}
        losses = [dpo_loss(*logps, loss_type=name, chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                           **{option: v}, **extra)[0] for v in values]
        assert (not torch.equal(*losses)) == (option in spec.options), name
