"""The built-in demo: tokenizer, generated preference task, judge, tiny Llama config."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from dpo_fast.demo_task import (
    demo_tokenizer,
    expected_completion,
    judge,
    make_preference_dataset,
    parse_prompt,
    read_vocab,
    tiny_llama_config,
    to_conversational,
)
from seeds import fresh_seed  # noqa: E402  (tests/ is on sys.path under pytest)


def _reference_answer(prompt: str) -> list[str]:
    """Independent statement of the rules, straight from the prompt text."""
    words = prompt.split()
    assert words[-1] == "="
    op, items = words[0], words[1:-1]
    return sorted(items) if op == "sort:" else items[::-1]


def test_tokenizer_round_trips_task_strings(tok):
    rows = make_preference_dataset(300, fresh_seed())
    assert len(tok) == len(read_vocab()) < 200
    for row in rows:
        for text in row.values():
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True) == text.strip()
            assert len(ids) == len(text.split()) + 1  # word level: one token per word, plus BOS


def test_tokenizer_is_deterministic_and_saves(tok, tmp_path):
    from transformers import AutoTokenizer

    again = demo_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    row = to_conversational(make_preference_dataset(1, fresh_seed())[0])
    msgs = row["prompt"] + row["chosen"]
    assert loaded.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    text = make_preference_dataset(1, fresh_seed())[0]["prompt"]
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]


def test_chat_template_renders_known_tokens(tok):
    row = to_conversational(make_preference_dataset(1, fresh_seed())[0])
    system = [{"role": "system", "content": "a b c"}]
    prompt = tok.apply_chat_template(system + row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(system + row["prompt"] + row["chosen"], tokenize=False)
    assert prompt.startswith(tok.bos_token) and prompt.endswith("<|assistant|>") and full.startswith(prompt)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and ids.count(tok.bos_token_id) == 1 and ids[-1] == tok.eos_token_id
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_judge_accepts_chosen_rejects_rejected_on_every_pair():
    rows = make_preference_dataset(2000, fresh_seed())
    for row in rows:
        ref = _reference_answer(row["prompt"])
        assert row["chosen"].split() == ref and row["rejected"].split() != ref
        assert judge(row["prompt"], row["chosen"]) and not judge(row["prompt"], row["rejected"])
        assert expected_completion(row["prompt"]) == " ".join(ref)
    for row in make_preference_dataset(200, fresh_seed(), conversational=True):
        assert judge(row["prompt"], row["chosen"][0]["content"])
        assert not judge(row["prompt"], row["rejected"][0]["content"])


def test_judge_edge_cases():
    assert judge("sort: 3 1 2 =", " 1 2 3 <eos>") and judge("sort: 3 1 2", "1  2 3\n")
    assert not judge("sort: 3 1 2 =", "1 2 3 3") and not judge("sort: 3 1 2 =", "") and not judge("reverse: a b =", "a b")
    assert judge("reverse: a b c =", "c b a")
    with pytest.raises(ValueError, match="prompt"):
        judge("count: a b =", "2")
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt("sort: =")
    with pytest.raises(TypeError, match="completion"):
        judge("sort: 1 2 =", None)


def test_dataset_deterministic_per_seed_and_varied():
    seed = fresh_seed()
    a = make_preference_dataset(400, seed)
    assert a == make_preference_dataset(400, seed)
    assert a != make_preference_dataset(400, seed + 1)
    assert make_preference_dataset(50, seed) == a[:50]
    tasks = Counter(parse_prompt(r["prompt"])[0] for r in a)
    assert set(tasks) == {"sort", "reverse"} and min(tasks.values()) > 100
    assert len({r["prompt"] for r in a}) > 350  # few repeats
    # near misses of several kinds: same length (swap/replace/copy) and shorter (drop)
    len_diff = Counter(len(r["chosen"].split()) - len(r["rejected"].split()) for r in a)
    assert set(len_diff) == {0, 1}
    assert min(len_diff.values()) > 40
    copies = sum(r["rejected"].split() == parse_prompt(r["prompt"])[1] for r in a)
    assert copies > 40
    with pytest.raises(ValueError, match="n"):
        make_preference_dataset(-1, seed)


def test_tiny_llama_config_is_small_and_runs(tok):
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config()
    assert cfg.vocab_size == len(tok) and cfg.num_hidden_layers <= 4
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e5 < n_params < 5e6
    row = make_preference_dataset(1, fresh_seed())[0]
    ids = torch.tensor([tok(row["prompt"] + row["chosen"])["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    assert tiny_llama_config(100, num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_llama_config(0)


def test_dataset_difficulty_options():
    seed = fresh_seed()
    rows = make_preference_dataset(300, seed, tasks=("reverse",), min_items=4, max_items=5, near_miss_kinds=("swap",))
    for row in rows:
        task, items = parse_prompt(row["prompt"])
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert task == "reverse" and 4 <= len(items) <= 5 and judge(row["prompt"], row["chosen"])
        # a swap of two neighbours: same items, exactly two adjacent positions differ
        diff = [i for i in range(len(chosen)) if chosen[i] != rejected[i]]
        assert sorted(rejected) == sorted(chosen) and len(diff) == 2 and diff[1] == diff[0] + 1
    assert make_preference_dataset(300, seed) != rows
    for kwargs in ({"tasks": ("count",)}, {"tasks": ()}, {"min_items": 1}, {"min_items": 5, "max_items": 4},
                   {"near_miss_kinds": ("shuffle",)}):
        with pytest.raises(ValueError):
            make_preference_dataset(3, seed, **kwargs)
