"""The reference log-prob cache is trusted only when its key (the trainer's real key) and checksum match:
a damaged, altered or stale cache is reported in one warning line and recomputed, never used."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from dpo_fast.train import DPOFastTrainer
from dpo_fast.train import ref_cache
from test_train import make_cfg  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def setup(cfg, tok):
    logs = []
    trainer = DPOFastTrainer(copy.copy(cfg), tokenizer=tok, log=logs.append).setup()
    return trainer, [line for line in logs if "warning" in line]


def ref_values(trainer):
    return torch.tensor([[e["ref_chosen_logps"], e["ref_rejected_logps"]] for e in trainer.train_examples])


@pytest.fixture
def cached(tok, tmp_path):
    """A run's config with its reference log-probs computed and cached once: (config, trainer, cache file)."""
    cfg = make_cfg(tok, tmp_path, n_rows=24, precompute_ref=True, batch_size=4)
    trainer, warnings = setup(cfg, tok)
    assert trainer.ref_cache_hits == [False] and not warnings
    path = ref_cache.cache_path(cfg.output, trainer.reference_cache_key(trainer.train_examples))
    assert os.path.isfile(path)
    again, warnings = setup(cfg, tok)
    assert again.ref_cache_hits == [True] and not warnings and torch.equal(ref_values(again), ref_values(trainer))
    return cfg, trainer, path


def assert_recomputed(cfg, tok, first, match):
    """The next run reports the cache in one warning line matching `match`, recomputes it and rewrites it."""
    trainer, warnings = setup(cfg, tok)
    assert trainer.ref_cache_hits == [False]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "reference log-prob cache" in warnings[0] and "recomputing" in warnings[0]
    assert match in warnings[0], warnings[0]
    assert torch.equal(ref_values(trainer), ref_values(first))  # the true values, not the cached ones
    third, warnings = setup(cfg, tok)  # the rewritten file is valid
    assert third.ref_cache_hits == [True] and not warnings


def test_truncated_cache_is_reported_and_rebuilt(tok, cached):
    cfg, first, path = cached
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    assert_recomputed(cfg, tok, first, "unreadable")
    with open(path, "wb"):  # empty
        pass
    assert_recomputed(cfg, tok, first, "unreadable")


def test_values_changed_in_place_fail_the_checksum(tok, cached):
    cfg, first, path = cached
    data = torch.load(path, weights_only=True)
    data["chosen"] += 5.0  # same key, same length, wrong values
    torch.save(data, path)
    assert_recomputed(cfg, tok, first, "checksum mismatch")
    data = torch.load(path, weights_only=True)
    data["rejected"][3] = data["rejected"][3] * (1 + 1e-6)  # one value, one ulp or so
    torch.save(data, path)
    assert_recomputed(cfg, tok, first, "checksum mismatch")


def test_a_file_of_another_key_or_without_one_is_stale(tok, cached):
    cfg, first, path = cached
    data = torch.load(path, weights_only=True)
    torch.save(dict(data, key="0" * 32), path)  # another key's file under this name
    assert_recomputed(cfg, tok, first, "stale key")
    torch.save({"chosen": data["chosen"], "rejected": data["rejected"]}, path)  # the format without key/checksum
    assert_recomputed(cfg, tok, first, "stale format")
    torch.save({"chosen": data["chosen"][:-1], "rejected": data["rejected"][:-1], "key": data["key"],
                "checksum": ref_cache.tensor_checksum(data["chosen"][:-1], data["rejected"][:-1])}, path)
    assert_recomputed(cfg, tok, first, "for 24 pairs")


def test_average_log_prob_changes_the_trainers_key(tok, cached):
    cfg, first, _ = cached
    averaged = copy.copy(cfg)
    averaged.average_log_prob = True
    trainer, warnings = setup(averaged, tok)
    assert trainer.ref_cache_hits == [False] and not warnings  # another key: a new file, not a stale one
    assert trainer.reference_cache_key(first.train_examples) != first.reference_cache_key(first.train_examples)
    # the averaged values really differ: a cache shared between the two would be wrong
    assert (ref_values(trainer) - ref_values(first)).abs().max() > 1e-3
    assert len(os.listdir(os.path.join(cfg.output, ref_cache.CACHE_DIR))) == 2
    ld = copy.copy(cfg)
    ld.ld_alpha = 0.5
    assert setup(ld, tok)[0].ref_cache_hits == [False]


def test_the_trainers_key_covers_prompt_chosen_and_rejected_ids(tok, cached):
    _, first, _ = cached
    examples = first.train_examples
    key = first.reference_cache_key(examples)
    assert first.reference_cache_key([dict(e) for e in examples]) == key  # deterministic
    # the attached reference values themselves are not part of the key
    stripped = [{k: v for k, v in e.items() if k not in ref_cache.REF_KEYS} for e in examples]
    assert first.reference_cache_key(stripped) == key
    for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
        changed = [dict(e) for e in examples]
        ids = list(changed[5][field])
        ids[-1] = (ids[-1] + 1) % len(first.tokenizer)
        changed[5][field] = ids
        assert first.reference_cache_key(changed) != key, field
    assert first.reference_cache_key(examples[:-1]) != key
    assert first.reference_cache_key(list(reversed(examples))) != key


def test_the_trainers_key_covers_the_model_and_its_loading(tok, cached):
    cfg, first, _ = cached
    key = first.reference_cache_key(first.train_examples)
    for change in ({"seed": cfg.seed + 1},  # another random init
                   {"max_length": 63}, {"truncation_mode": "keep_start"}):
        other = copy.copy(cfg)
        for name, value in change.items():
            setattr(other, name, value)
        trainer = DPOFastTrainer(other, tokenizer=tok, log=lambda s: None)
        trainer.cfg.precompute_ref = False  # the key only: no reference pass
        trainer.setup()
        assert trainer.reference_cache_key(first.train_examples) != key, change
