"""Hub model / tokenizer / adapter ids: resolved offline from a cache laid out as after a download."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dpo_fast import hub
from dpo_fast.cli import main
from dpo_fast.demo_task import make_preference_dataset
from dpo_fast.errors import UserError
from dpo_fast.train.config import TrainConfig
from dpo_fast.train.logging import read_metrics
from dpo_fast.train.model_loading import load_model, model_identity
from hf_fixtures import offline_hub, put_in_hub_cache, save_tiny_checkpoint, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAIN = "a" * 40
V2 = "b" * 40
ADAPTER = "c" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline HF cache holding org/tiny (main: 2 layers, tag v2: 1 layer) and the LoRA adapter org/tiny-lora."""
    cache = offline_hub(monkeypatch, tmp_path / "hf_home")
    tok = tiny_tokenizer(tmp_path)
    put_in_hub_cache(cache, "org/tiny", save_tiny_checkpoint(tmp_path / "main", tok, layers=2), MAIN)
    put_in_hub_cache(cache, "org/tiny", save_tiny_checkpoint(tmp_path / "v2", tok, layers=1, seed=1), V2, ref="v2")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "main"))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained-looking adapter: B != 0, so loading it changes the model's output
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    put_in_hub_cache(cache, "org/tiny-lora", tmp_path / "adapter", ADAPTER)
    (tmp_path / "half").mkdir()  # an interrupted download: the adapter's config is cached, its weights are not
    (tmp_path / "half" / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    put_in_hub_cache(cache, "org/half-lora", tmp_path / "half", ADAPTER)
    return cache


def _data(tmp_path, n=16):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_preference_dataset(n, seed=3)))
    return str(path)


def run_cli(argv, capsys):
    """(exit status, stderr) of `dpo-fast ARGV`; a UserError the CLI does not print itself counts as status 2."""
    try:
        code = main(argv)
    except UserError as exc:
        return 2, str(exc)
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err
    return code, capsys.readouterr().err


def test_hub_id_tells_local_paths_from_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert hub.is_hub_id("org/name") and hub.is_hub_id("gpt2")
    assert not hub.is_hub_id("org/local")  # an existing folder wins over the id of the same name
    assert not hub.is_hub_id("./ckpt") and not hub.is_hub_id("/abs/ckpt") and not hub.is_hub_id("a/b/c")
    assert not hub.is_hub_id(None) and not hub.is_hub_id("")


def test_train_from_a_hub_model_id_offline(cache, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["train", "--model", "org/tiny", "--data", _data(tmp_path), "--output", str(out),
                         "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--no-progress", "--no-plot",
                         "--no-tensorboard", "--device", "cpu"], capsys)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r] == [1, 2]
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert json.loads((out / "train_config.json").read_text())["model"] == "org/tiny"
    # the run's identity names the commit the id resolved to, so another revision is another run
    assert json.loads((out / "run.json").read_text())["identity"]["model"] == f"hub:org/tiny@{MAIN}"


def test_a_hub_model_of_an_unsupported_architecture_is_named_before_its_weights(cache, tmp_path, capsys):
    from transformers import GPT2Config

    config_only = tmp_path / "gpt2_config"
    config_only.mkdir()
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(config_only)  # config.json alone: no weights cached
    put_in_hub_cache(cache, "org/gpt", config_only, "d" * 40)
    code, err = run_cli(["train", "--model", "org/gpt", "--data", _data(tmp_path), "--output", str(tmp_path / "o"),
                         "--device", "cpu"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--model org/gpt" in err and "model_type='gpt2'" in err, err
    assert not os.path.exists(tmp_path / "o")


def test_a_folder_without_preference_data_files_is_refused_before_loading(cache, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")  # load_dataset would read it as a 'text' column, never pairs
    code, err = run_cli(["train", "--model", "org/tiny", "--data", _data(tmp_path), "--eval-data", str(folder),
                         "--output", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert code == 2 and err.strip().startswith("dpo-fast: error: --eval-data") and "save_to_disk" in err, err


def test_revision_picks_the_snapshot_and_names_the_commit(cache, tmp_path):
    def load(revision):
        cfg = TrainConfig(model="org/tiny", revision=revision, data=[], output=str(tmp_path / "o"), patch=False)
        return load_model(cfg, device=torch.device("cpu"))

    main_model, v2_model = load(None), load("v2")
    layers = lambda m: m.base_model.model.model.config.num_hidden_layers  # noqa: E731
    assert (layers(main_model.model), layers(v2_model.model)) == (2, 1)
    assert hub.identity("org/tiny", "config.json", flag="--model") == f"hub:org/tiny@{MAIN}"
    assert hub.identity("org/tiny", "config.json", flag="--model", revision="v2") == f"hub:org/tiny@{V2}"
    # the reference cache key follows the weights: another revision is another model
    assert main_model.model_id == model_identity("org/tiny", None, 42)
    assert main_model.model_id != v2_model.model_id
    # the run identity's model: the commit each revision resolves to
    assert (main_model.fingerprint, v2_model.fingerprint) == (f"hub:org/tiny@{MAIN}", f"hub:org/tiny@{V2}")
    assert len(main_model.tokenizer) == len(v2_model.tokenizer) > 0


def test_train_with_a_hub_adapter_offline(cache, tmp_path, capsys):
    from safetensors.torch import load_file

    saved = load_file(str(cache / "models--org--tiny-lora" / "snapshots" / ADAPTER / "adapter_model.safetensors"))
    cfg = TrainConfig(model="org/tiny", adapter="org/tiny-lora", data=[], output=str(tmp_path / "o"), patch=False)
    loaded = load_model(cfg, device=torch.device("cpu"))
    params = dict(loaded.model.named_parameters())
    for key, value in saved.items():
        if "lora_B" in key:
            name = key.replace(".weight", ".default.weight")
            torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=0)
    assert loaded.has_ref_adapter
    assert loaded.model_id != model_identity("org/tiny", None, 42)  # the adapter is part of the reference

    out = tmp_path / "out"
    code, err = run_cli(["train", "--model", "org/tiny", "--adapter", "org/tiny-lora", "--data", _data(tmp_path),
                         "--output", str(out), "--max-steps", "1", "--batch-size", "4", "--max-length", "64",
                         "--no-progress", "--no-plot", "--no-tensorboard", "--device", "cpu"], capsys)
    assert code == 0, err
    first = [r for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r][0]
    assert abs(first["loss"] - math.log(2)) < 1e-5  # the policy starts equal to its frozen copy of the adapter


@pytest.mark.parametrize("flags, flag, repo", [
    (["--model", "org/missing"], "--model", "org/missing"),
    (["--model", "org/tiny", "--tokenizer", "org/no-tokenizer"], "--tokenizer", "org/no-tokenizer"),
    (["--model", "org/tiny", "--adapter", "org/no-adapter"], "--adapter", "org/no-adapter"),
    (["--model", "org/tiny", "--adapter", "org/half-lora"], "--adapter", "org/half-lora"),
    (["--model", "org/tiny", "--revision", "v3"], "--model", "org/tiny"),
])
def test_an_id_not_in_the_cache_offline_is_one_line(cache, tmp_path, capsys, flags, flag, repo):
    code, err = run_cli(["train", *flags, "--data", _data(tmp_path), "--output", str(tmp_path / "o"),
                         "--max-steps", "1", "--no-progress", "--device", "cpu"], capsys)
    assert code == 2
    line = err.strip().splitlines()
    assert len(line) == 1, err
    for needle in (f"{flag}: '{repo}'", "not in the local Hugging Face cache", str(cache),
                   "the Hub is unreachable (HF_HUB_OFFLINE is set)", f"hf download {repo}"):
        assert needle in line[0]
    assert not os.path.exists(tmp_path / "o" / "checkpoint-1")


def test_offline_error_says_no_network_when_offline_mode_is_off(monkeypatch):
    from huggingface_hub import constants, errors

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cause = errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")
    try:
        try:
            raise cause
        except errors.LocalEntryNotFoundError as inner:
            raise OSError("We couldn't connect to 'https://huggingface.co'") from inner
    except OSError as exc:
        error = hub.hub_user_error(exc, "org/x", flag="--model", revision="v1")
    assert "'org/x' (revision 'v1')" in str(error) and "(no network connection)" in str(error)
    assert "hf download org/x --revision v1" in str(error)
    assert hub.hub_user_error(OSError("disk full"), "org/x", flag="--model") is None
