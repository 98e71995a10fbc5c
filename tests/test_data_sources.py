"""--data / --eval-data as Hub dataset ids (the arguments handed to datasets.load_dataset), a local folder laid out
like a dataset repository, and how a separate eval set and --eval-fraction go together."""
from __future__ import annotations

import json

import pytest

from dpo_fast.cli import build_parser, config_from_args
from dpo_fast.data_sources import DataSource, open_source, train_and_eval_sources
from dpo_fast.errors import UserError
from dpo_fast.train.trainer import DPOFastTrainer
from hf_fixtures import datasets_cache_in, offline_hub, save_tiny_checkpoint, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds_ckpt")
    return save_tiny_checkpoint(path, tiny_tokenizer(path))


def pairs(n, first):
    """n conversational pairs (trl-lib/ultrafeedback_binarized's schema); the user turns hold `first`, first+1..."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [{"chosen": [{"role": "user", "content": letters[(first + i) % 26]}, {"role": "assistant", "content": "1"}],
             "rejected": [{"role": "user", "content": letters[(first + i) % 26]},
                          {"role": "assistant", "content": "2 3"}]} for i in range(n)]


def trainer_for(argv):
    args = build_parser().parse_args(["train", *argv, "--no-progress", "--device", "cpu", "--no-patch"])
    return DPOFastTrainer(config_from_args(args, "dpo"), log=lambda text: None)


def user_turns(trainer, examples):
    tok = trainer.tokenizer
    return sorted(tok.convert_ids_to_tokens(e["prompt_ids"])[2] for e in examples)


def test_hub_dataset_id_arguments_reach_load_dataset(checkpoint, tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(pairs(5, 0) if kwargs["split"] == "train_prefs" else pairs(3, 10))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    trainer = trainer_for(["--model", checkpoint, "--data", "HuggingFaceH4/ultrafeedback_binarized",
                           "--data-split", "train_prefs", "--data-config", "default", "--data-revision", "abc123",
                           "--eval-split", "test_prefs", "--output", str(tmp_path / "o")]).setup()
    expected = {"name": "default", "revision": "abc123"}
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", {"split": "train_prefs", **expected}),
                     ("HuggingFaceH4/ultrafeedback_binarized", {"split": "test_prefs", **expected})]
    assert user_turns(trainer, trainer.train_examples) == list("abcde")
    assert user_turns(trainer, trainer.eval_examples) == list("klm")

    calls.clear()  # a separate eval dataset gets its own split, not --data's configuration or revision
    trainer = trainer_for(["--model", checkpoint, "--data", "trl-lib/ultrafeedback_binarized", "--data-revision", "r1",
                           "--data-config", "default",
                           "--eval-data", "org/other", "--eval-split", "test_prefs",
                           "--output", str(tmp_path / "o2")]).setup()
    assert calls == [("trl-lib/ultrafeedback_binarized", {"split": "train", "name": "default", "revision": "r1"}),
                     ("org/other", {"split": "test_prefs"})]
    assert len(trainer.eval_examples) == 3 and len(trainer.train_examples) == 3


def _snapshot_folder(tmp_path):
    """A folder laid out like a dataset repository snapshot (data/<split>-00000-of-00001.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ultrafeedback"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(pairs(6, 0)), str(folder / "data" / "train_prefs-00000-of-00001.parquet"))
    pq.write_table(pa.Table.from_pylist(pairs(2, 20)), str(folder / "data" / "test_prefs-00000-of-00001.parquet"))
    return str(folder)


def test_local_dataset_repo_folder_with_splits(checkpoint, tmp_path, monkeypatch):
    datasets_cache_in(monkeypatch, tmp_path / "datasets_cache")
    folder = _snapshot_folder(tmp_path)
    trainer = trainer_for(["--model", checkpoint, "--data", folder, "--data-split", "train_prefs",
                           "--eval-split", "test_prefs", "--output", str(tmp_path / "o")]).setup()
    assert user_turns(trainer, trainer.train_examples) == list("abcdef")
    assert user_turns(trainer, trainer.eval_examples) == list("uv")

    with pytest.raises(UserError, match=r"--data-split: .*Unknown split \"train\".*'test_prefs', 'train_prefs'.*"
                                        r"pick one with --data-split"):
        open_source(DataSource(folder))
    with pytest.raises(UserError, match="--eval-split: .*test_pref"):
        open_source(DataSource(folder, "test_pref", split_flag="--eval-split"))


def test_saved_dataset_dict_split_and_file_options(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(pairs(2, 0)),
                          "test_prefs": datasets.Dataset.from_list(pairs(1, 5))}).save_to_disk(str(saved))
    assert len(open_source(DataSource(str(saved), "test_prefs"))) == 1
    with pytest.raises(UserError, match=r"no split 'train'; its splits are \['train_prefs', 'test_prefs'\]"):
        open_source(DataSource(str(saved)))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(pairs(1, 0)[0]) + "\n")
    assert open_source(DataSource(str(path))) == str(path)  # files are read (with line numbers) by dpo_fast.data
    with pytest.raises(UserError, match="--data-split: .*p.jsonl is a file"):
        open_source(DataSource(str(path), "train"))
    assert open_source(DataSource("missing/pairs.jsonl")) == "missing/pairs.jsonl"  # a missing file, not a Hub id


def test_eval_set_options_are_coherent(tmp_path):
    base = ["train", "--model", "m", "--data", "org/ds", "--output", "o"]
    for extra in (["--eval-split", "test"], ["--eval-data", "e.jsonl"]):
        args = build_parser().parse_args([*base, "--eval-fraction", "0.1", *extra])
        with pytest.raises(ValueError, match="eval_fraction: give one eval set"):
            config_from_args(args, "dpo")
    with pytest.raises(UserError, match="--eval-split: the eval split 'train' is the training split"):
        train_and_eval_sources("org/ds", eval_split="train")
    train, evals = train_and_eval_sources("org/ds", data_split="train_prefs", data_config="c", eval_split="test_prefs")
    assert (evals.spec, evals.split, evals.config, evals.split_flag) == ("org/ds", "test_prefs", "c", "--eval-split")
    assert train_and_eval_sources("org/ds")[1] is None


def test_hub_dataset_not_cached_offline_is_one_line(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hf_home")
    with pytest.raises(UserError) as exc:
        open_source(DataSource("org/not-cached", "train_prefs", flag="--eval-data"))
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("--eval-data: 'org/not-cached' is not a local path and not in the local Hugging Face "
                              "cache")
    assert "the Hub is unreachable (HF_HUB_OFFLINE is set)" in message
    assert "hf download org/not-cached --repo-type dataset" in message
