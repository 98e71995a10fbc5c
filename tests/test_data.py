"""Data pipeline: loading every format, bad rows, tokenization and truncation, collation, batching."""
from __future__ import annotations

import json
import random

import pytest
import torch

from dpo_fast.data import (
    BadRowError,
    LengthGroupedBatchSampler,
    PreferenceCollator,
    example_length,
    load_preference_rows,
    split_eval,
    tokenize_pairs,
)
from dpo_fast.demo_task import demo_tokenizer, make_preference_dataset
from seeds import fresh_seed  # noqa: E402  (tests/ is on sys.path under pytest)


def _write(path, rows, fmt):
    """Write `rows` to `path` in `fmt`; returns the source to load."""
    if fmt == "jsonl":
        path = path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    elif fmt == "save_to_disk":
        import datasets

        path = path / "ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "dataset":
        import datasets

        return datasets.Dataset.from_list(rows)
    elif fmt == "list":
        return [dict(r) for r in rows]
    return str(path)


FORMATS = ["jsonl", "json", "parquet", "save_to_disk", "dataset", "list"]


# ----------------------------------------------------------------------------- loading formats


@pytest.mark.parametrize("fmt", FORMATS)
def test_standard_rows_load_from_every_source(tmp_path, fmt):
    rows = make_preference_dataset(23, fresh_seed())
    got, report = load_preference_rows(_write(tmp_path, rows, fmt))
    assert report.n_read == report.n_kept == 23 and report.n_skipped == 0
    assert report.formats == {"standard": 23}
    assert [g["row"] for g in got] == list(range(23))
    assert [{k: g[k] for k in ("prompt", "chosen", "rejected")} for g in got] == rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "save_to_disk", "dataset"])
def test_conversational_explicit_prompt(tmp_path, fmt):
    rows = make_preference_dataset(11, fresh_seed(), conversational=True)
    rows[3]["prompt"] = [{"role": "system", "content": "be exact"}] + rows[3]["prompt"]
    got, report = load_preference_rows(_write(tmp_path, rows, fmt))
    assert report.n_kept == 11 and report.formats == {"conversational": 11}
    assert [{k: g[k] for k in ("prompt", "chosen", "rejected")} for g in got] == rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_conversational_implicit_prompt_takes_shared_turns(tmp_path, fmt):
    rows = make_preference_dataset(9, fresh_seed(), conversational=True)
    # a multi-turn pair: the shared assistant turn belongs to the prompt
    rows[0]["prompt"] = rows[0]["prompt"] + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    got, report = load_preference_rows(_write(tmp_path, implicit, fmt))
    assert report.n_kept == 9 and report.formats == {"conversational_implicit_prompt": 9}
    assert [{k: g[k] for k in ("prompt", "chosen", "rejected")} for g in got] == rows


def test_standard_implicit_prompt_is_shared_prefix():
    rows = make_preference_dataset(60, fresh_seed())
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    # a completion that is a prefix of the other leaves nothing after the shared prompt
    prefix = [i for i, r in enumerate(implicit) if r["chosen"].startswith(r["rejected"])]
    got, report = load_preference_rows(implicit)
    assert [(b.index, b.reason) for b in report.bad_rows] == [(i, "empty_completion") for i in prefix]
    assert report.n_kept == 60 - len(prefix) and report.formats == {"implicit_prompt": 60 - len(prefix)}
    for g in got:
        src = implicit[g["row"]]
        assert g["prompt"] + g["chosen"] == src["chosen"] and g["prompt"] + g["rejected"] == src["rejected"]
        assert g["prompt"].startswith(rows[g["row"]]["prompt"])
        # split where they first differ; a space just before that point goes to the completions
        c, r = g["chosen"], g["rejected"]
        assert c[0] != r[0] or (c[0] == r[0] == " " and c[1:2] != r[1:2])


def test_json_file_holding_jsonl_and_dict_wrapper(tmp_path):
    rows = make_preference_dataset(5, fresh_seed())
    p = tmp_path / "lines.json"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    assert [g["chosen"] for g in load_preference_rows(str(p))[0]] == [r["chosen"] for r in rows]
    p2 = tmp_path / "wrapped.json"
    p2.write_text(json.dumps({"train": rows}))
    assert load_preference_rows(str(p2))[1].n_kept == 5


def test_ref_logps_pass_through():
    rows = make_preference_dataset(4, fresh_seed())
    vals = torch.randn(4, 2).tolist()
    for r, (a, b) in zip(rows, vals):
        r["ref_chosen_logps"], r["ref_rejected_logps"] = a, b
    got, _ = load_preference_rows(rows)
    assert [(g["ref_chosen_logps"], g["ref_rejected_logps"]) for g in got] == [tuple(v) for v in vals]


# ----------------------------------------------------------------------------- bad rows

_U = {"role": "user", "content": "sort: 2 1 ="}
_A = {"role": "assistant", "content": "1 2"}
_B = {"role": "assistant", "content": "2 1"}

BAD_ROWS = {
    "missing chosen": ({"prompt": "p", "rejected": " r"}, "missing_key", "missing key 'chosen'"),
    "missing rejected": ({"prompt": "p", "chosen": " c"}, "missing_key", "missing key 'rejected'"),
    "null rejected": ({"prompt": "p", "chosen": " c", "rejected": None}, "missing_key", "missing key 'rejected'"),
    "empty chosen": ({"prompt": "p", "chosen": "", "rejected": " r"}, "empty_completion", "'chosen' is empty"),
    "blank rejected": ({"prompt": "p", "chosen": " c", "rejected": "   "}, "empty_completion", "'rejected' is empty"),
    "identical": ({"prompt": "p", "chosen": " c", "rejected": " c"}, "identical_completions", "chosen == rejected"),
    "int chosen": ({"prompt": "p", "chosen": 3, "rejected": " r"}, "non_string_content", "'chosen' is int"),
    "int prompt": ({"prompt": 7, "chosen": " c", "rejected": " r"}, "non_string_content", "'prompt' is int"),
    "not an object": ([1, 2, 3], "not_an_object", "not an object"),
    "int content": ({"prompt": [_U], "chosen": [{"role": "assistant", "content": 5}], "rejected": [_B]},
                    "non_string_content", "content is int"),
    "unknown role": ({"prompt": [{"role": "robot", "content": "x"}], "chosen": [_A], "rejected": [_B]},
                     "bad_roles", "role 'robot'"),
    "prompt ends with assistant": ({"prompt": [_U, _A], "chosen": [_A], "rejected": [_B]}, "bad_roles",
                                   "prompt ends with an assistant"),
    "completion by user": ({"prompt": [_U], "chosen": [_U], "rejected": [_B]}, "bad_roles", "'chosen' must start"),
    "empty assistant": ({"prompt": [_U], "chosen": [{"role": "assistant", "content": " "}], "rejected": [_B]},
                        "empty_completion", "empty assistant message"),
    "empty message list": ({"prompt": [_U], "chosen": [], "rejected": [_B]}, "empty_completion", "empty list"),
    "no shared turn": ({"chosen": [_U, _A], "rejected": [{"role": "user", "content": "x"}, _B]}, "bad_roles",
                       "share no leading message"),
    "string vs messages": ({"prompt": [_U], "chosen": "1 2", "rejected": [_B]}, "non_string_content",
                           "'chosen' is str"),
}


def _bad_file(tmp_path):
    """A JSONL file: good rows, every bad kind, a blank line and a broken line; returns (path, expected)."""
    good = make_preference_dataset(len(BAD_ROWS) + 3, fresh_seed())
    lines, expected, n_good = [], {}, 0
    for name, (row, reason, _) in BAD_ROWS.items():
        lines.append(json.dumps(good[n_good]))
        n_good += 1
        lines.append(json.dumps(row))
        expected[len(lines)] = reason
    lines.append("")
    lines.append('{"prompt": "p", "chosen": ')
    expected[len(lines)] = "invalid_json"
    lines.append(json.dumps(good[n_good]))
    n_good += 1
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, expected, good[:n_good]


def test_bad_rows_skipped_with_line_numbers(tmp_path):
    path, expected, good = _bad_file(tmp_path)
    rows, report = load_preference_rows(str(path), on_bad_row="skip")
    assert {int(b.location.split()[1]): b.reason for b in report.bad_rows} == expected
    assert all(b.location.startswith("line ") for b in report.bad_rows)
    assert report.n_read == len(expected) + len(good) and report.n_kept == len(good)
    assert report.n_read == report.n_kept + report.n_skipped and report.blank_lines == 1
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == good
    text = report.summary(max_listed=100)
    for lineno in expected:
        assert f"line {lineno}:" in text


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_row_error_mode_names_line_and_reason(tmp_path, name):
    row, reason, message = BAD_ROWS[name]
    good = make_preference_dataset(2, fresh_seed())
    path = tmp_path / "one_bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good[0], good[1], row]) + "\n")
    with pytest.raises(ValueError, match=rf"line 3: .*{message}"):
        load_preference_rows(str(path), on_bad_row="error")
    rows, report = load_preference_rows(str(path))
    assert len(rows) == 2 and [(b.location, b.reason) for b in report.bad_rows] == [("line 3", reason)]


@pytest.mark.parametrize("fmt", ["parquet", "list"])
def test_bad_rows_in_tabular_sources_report_row_index(tmp_path, fmt):
    rows = make_preference_dataset(6, fresh_seed())
    rows[2] = dict(rows[2], rejected=rows[2]["chosen"])
    rows[4] = dict(rows[4], chosen="")
    got, report = load_preference_rows(_write(tmp_path, rows, fmt))
    assert [(b.location, b.reason) for b in report.bad_rows] == [("row 2", "identical_completions"),
                                                                 ("row 4", "empty_completion")]
    assert [g["row"] for g in got] == [0, 1, 3, 5]
    with pytest.raises(BadRowError, match="row 2: chosen == rejected"):
        load_preference_rows(_write(tmp_path, rows, fmt), on_bad_row="error")


def test_load_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="on_bad_row"):
        load_preference_rows([], on_bad_row="ignore")
    with pytest.raises(FileNotFoundError, match="source"):
        load_preference_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_preference_rows(str(tmp_path / "x.csv"))
    with pytest.raises(TypeError, match="source"):
        load_preference_rows(42)
    (tmp_path / "obj.json").write_text(json.dumps({"a": 1, "b": 2}))
    with pytest.raises(ValueError, match="list of row objects"):
        load_preference_rows(str(tmp_path / "obj.json"))


# ----------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_non_utf8_byte_costs_its_line_only(tmp_path, newline):
    good = make_preference_dataset(5, fresh_seed())
    lines = [json.dumps(r).encode() for r in good]
    bad = json.dumps({"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}).encode()
    bad = bad.replace(b" 3 1\"}", b" 3 \xff1\"}")  # one Latin-1 byte inside the rejected string
    lines.insert(2, bad)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(newline.encode().join(lines) + newline.encode())
    rows, report = load_preference_rows(str(path))
    assert [(b.location, b.reason) for b in report.bad_rows] == [("line 3", "invalid_utf8")]
    assert "0xff" in report.bad_rows[0].message and "line 3: not valid UTF-8" in report.summary()
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == good
    assert [r["location"] for r in rows] == ["line 1", "line 2", "line 4", "line 5", "line 6"]
    with pytest.raises(BadRowError, match="line 3: not valid UTF-8"):
        load_preference_rows(str(path), on_bad_row="error")
    # the same lines in a .json file (JSON lines): still one row lost
    json_lines = tmp_path / "latin1.json"
    json_lines.write_bytes(path.read_bytes())
    assert [b.location for b in load_preference_rows(str(json_lines))[1].bad_rows] == ["line 3"]


def test_non_utf8_byte_in_one_json_document_names_the_line(tmp_path):
    rows = make_preference_dataset(4, fresh_seed())
    text = json.dumps(rows, indent=1).encode()
    line_of_rejected = text[: text.index(b'"rejected"')].count(b"\n") + 1
    path = tmp_path / "doc.json"
    path.write_bytes(text.replace(b'"rejected": "', b'"rejected": "\xe9', 1))
    with pytest.raises(ValueError, match=rf"line {line_of_rejected}: not valid UTF-8 \(byte 0xe9\)"):
        load_preference_rows(str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_lines"])
def test_utf8_byte_order_mark_is_not_a_bad_row(tmp_path, fmt):
    rows = make_preference_dataset(3, fresh_seed())
    text = json.dumps(rows) if fmt == "json" else "\n".join(json.dumps(r) for r in rows) + "\n"
    path = tmp_path / ("d.jsonl" if fmt == "jsonl" else "d.json")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    got, report = load_preference_rows(str(path))
    assert report.n_skipped == 0 and report.n_kept == 3
    assert [{k: g[k] for k in ("prompt", "chosen", "rejected")} for g in got] == rows


def test_prompts_longer_than_max_length_are_reported_by_line(tmp_path, tok):
    rng = random.Random(fresh_seed())
    lines, long_lines = [], []
    for lineno in range(1, 41):
        n = rng.choice([2, 3, 20]) if lineno > 1 else 20
        if n == 20:
            long_lines.append(lineno)
        prompt = "sort: " + " ".join(rng.choice("0123456789") for _ in range(n)) + " ="
        lines.append(json.dumps({"prompt": prompt, "chosen": " a", "rejected": " b"}))
        if lineno == 7:
            lines.append("")  # a blank line: numbering still follows the file
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(lines) + "\n")
    long_lines = [n + (n > 7) for n in long_lines]
    rows, _ = load_preference_rows(str(path))
    examples, report = tokenize_pairs(rows, tok, max_length=16)
    assert len(long_lines) > 5 and report.n_kept == 40 - len(long_lines)
    assert [report.locations[r] for r in report.dropped_prompt_too_long] == [f"line {n}" for n in long_lines]
    text = report.summary()
    shown = ", ".join(f"line {n}" for n in long_lines[:5])
    assert f"dropped {len(long_lines)} whose prompt alone" in text
    assert f"prompt alone >= max_length (raise --max-length or set --max-prompt-length to truncate prompts): " \
           f"{shown}, ... and {len(long_lines) - 5} more" in text
    # rows without a location (a list passed directly) are named by their row index
    plain = [{k: r[k] for k in ("prompt", "chosen", "rejected", "row")} for r in rows]
    _, report = tokenize_pairs(plain, tok, max_length=16)
    assert report.where(report.dropped_prompt_too_long[:1]) == f"row {report.dropped_prompt_too_long[0]}"


# ----------------------------------------------------------------------------- tokenization


def test_standard_tokenization_bos_and_eos(tok):
    rows, _ = load_preference_rows(make_preference_dataset(30, fresh_seed()))
    rows[0]["chosen"] = rows[0]["chosen"] + tok.eos_token  # already ends with EOS: not doubled
    examples, report = tokenize_pairs(rows, tok, max_length=None)
    assert report.n_kept == 30 and report.n_prefix_mismatch == 0
    for ex, row in zip(examples, rows):
        assert ex["prompt_ids"] == tok(row["prompt"])["input_ids"] and ex["prompt_ids"][0] == tok.bos_token_id
        for key in ("chosen", "rejected"):
            text = row[key].replace(tok.eos_token, "")
            assert ex[f"{key}_ids"] == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            full = ex["prompt_ids"] + ex[f"{key}_ids"]
            assert full.count(tok.bos_token_id) == 1 and full.count(tok.eos_token_id) == 1
    no_eos, _ = tokenize_pairs(rows[1:], tok, add_eos=False)
    assert all(tok.eos_token_id not in ex["chosen_ids"] + ex["rejected_ids"] for ex in no_eos)


def test_chat_template_path(tok):
    rows, _ = load_preference_rows(make_preference_dataset(12, fresh_seed(), conversational=True))
    examples, report = tokenize_pairs(rows, tok)
    assert report.n_kept == 12 and report.n_prefix_mismatch == 0
    for ex, row in zip(examples, rows):
        prompt_text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert prompt_text.endswith("<|assistant|>") and prompt_text.startswith(tok.bos_token)
        assert ex["prompt_ids"] == tok(prompt_text, add_special_tokens=False)["input_ids"]
        for key in ("chosen", "rejected"):
            full_text = tok.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            full = tok(full_text, add_special_tokens=False)["input_ids"]
            assert ex["prompt_ids"] + ex[f"{key}_ids"] == full  # template closes the turn; no extra EOS
            assert tok.decode(ex[f"{key}_ids"], skip_special_tokens=True).strip() == row[key][0]["content"]
            assert tok.unk_token_id not in full


def test_conversational_needs_chat_template(tok):
    rows, _ = load_preference_rows(make_preference_dataset(2, fresh_seed(), conversational=True))
    bare = demo_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_pairs(rows, bare)


def _long_rows(n, seed):
    """Rows with prompts and completions of widely varying token lengths (word-level: 1 token per word)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "sort: " + " ".join(rng.choice("0123456789") for _ in range(rng.randint(1, 30))) + " ="
        chosen = " " + " ".join(rng.choice("abc") for _ in range(rng.randint(1, 12)))
        rejected = " z" + chosen  # differs at the first token, never identical after a cut
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return load_preference_rows(rows)[0]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
@pytest.mark.parametrize("max_prompt_length", [None, 9])
def test_truncation_modes_and_dropped_prompts(tok, mode, max_prompt_length):
    rows = _long_rows(60, fresh_seed())
    max_length = 16
    full, _ = tokenize_pairs(rows, tok, max_length=None)
    examples, report = tokenize_pairs(
        rows, tok, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode
    )
    # straightforward reference of the rules
    expected, dropped, n_prompt_cut, n_comp_cut = [], [], 0, 0
    for ex in full:
        p = ex["prompt_ids"]
        if max_prompt_length is not None and len(p) > max_prompt_length:
            n_prompt_cut += 1
            p = p[:max_prompt_length] if mode == "keep_start" else [p[0]] + p[len(p) - max_prompt_length + 1:]
        if len(p) >= max_length:
            dropped.append(ex["row"])
            continue
        room = max_length - len(p)
        n_comp_cut += int(len(ex["chosen_ids"]) > room or len(ex["rejected_ids"]) > room)
        expected.append({"prompt_ids": p, "chosen_ids": ex["chosen_ids"][:room],
                         "rejected_ids": ex["rejected_ids"][:room], "row": ex["row"]})
    assert examples == expected
    assert report.dropped_prompt_too_long == dropped and report.n_kept == len(expected)
    assert report.n_prompt_truncated == n_prompt_cut and report.n_completion_truncated == n_comp_cut
    assert report.n_kept + report.n_dropped == report.n_in == 60
    if max_prompt_length is None:
        assert len(dropped) > 0  # the random prompts include ones longer than max_length
    else:
        assert dropped == [] and n_prompt_cut > 0
    for ex in examples:
        assert ex["prompt_ids"][0] == tok.bos_token_id
        assert len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= max_length
    assert f"dropped {len(dropped)}" in report.summary()


def _tokenizer_without_bos():
    """The demo vocabulary as a tokenizer with no BOS token at all (as Qwen's): nothing is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dpo_fast.demo_task import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, read_vocab

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(read_vocab())}, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=UNK_TOKEN, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_truncation_without_a_bos_token(mode):
    no_bos = _tokenizer_without_bos()
    assert no_bos.bos_token_id is None
    rows = _long_rows(40, fresh_seed())
    full, _ = tokenize_pairs(rows, no_bos, max_length=None)
    assert all(ex["prompt_ids"] == no_bos(row["prompt"])["input_ids"] for ex, row in zip(full, rows))
    limit = 7
    examples, report = tokenize_pairs(rows, no_bos, max_length=None, max_prompt_length=limit, truncation_mode=mode)
    n_cut = 0
    for ex, whole in zip(examples, full):
        p = whole["prompt_ids"]
        n_cut += len(p) > limit
        assert ex["prompt_ids"] == (p[-limit:] if mode == "keep_end" else p[:limit])
        assert ex["chosen_ids"] == whole["chosen_ids"] and ex["rejected_ids"] == whole["rejected_ids"]
    assert n_cut > 10 and report.n_prompt_truncated == n_cut
    if mode == "keep_end":  # every kept prompt ends with the task's "=" (the end was kept, not the start)
        eq = no_bos.convert_tokens_to_ids("=")
        assert all(ex["prompt_ids"][-1] == eq for ex in examples)


def test_pairs_identical_after_truncation_are_dropped_and_counted(tok):
    rows, _ = load_preference_rows([
        {"prompt": "sort: 1 =", "chosen": " a b c d", "rejected": " a b c e"},
        {"prompt": "sort: 2 =", "chosen": " a", "rejected": " b"},
    ])
    examples, report = tokenize_pairs(rows, tok, max_length=6)  # prompt 4 tokens, room 2: "a b" == "a b"
    assert [ex["row"] for ex in examples] == [1]
    assert report.dropped_identical_after_truncation == [0] and report.n_dropped == 1


def test_tokenize_argument_errors(tok):
    rows, _ = load_preference_rows(make_preference_dataset(2, fresh_seed()))
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_pairs(rows, tok, truncation_mode="middle")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pairs(rows, tok, max_length=0)
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pairs(rows, tok, max_length=8, max_prompt_length=8)
    with pytest.raises(TypeError, match="tokenizer"):
        tokenize_pairs(rows, "not a tokenizer")


# ----------------------------------------------------------------------------- collator


def _random_examples(b, with_ref):
    g = torch.Generator().manual_seed(fresh_seed())

    def ids(lo, hi):
        n = int(torch.randint(lo, hi, (), generator=g))
        return torch.randint(1, 40, (n,), generator=g).tolist()

    out = []
    for _ in range(b):
        ex = {"prompt_ids": ids(1, 9), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)}
        if with_ref:
            ex["ref_chosen_logps"], ex["ref_rejected_logps"] = torch.randn(2, generator=g).tolist()
        out.append(ex)
    return out


@pytest.mark.parametrize("b", [1, 3, 5])
@pytest.mark.parametrize("with_ref", [False, True])
def test_collator_layout(b, with_ref):
    examples = _random_examples(b, with_ref)
    batch = PreferenceCollator(pad_token_id=0)(examples)
    width = max(example_length(ex) for ex in examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["completion_mask"].shape == (2 * b, width)
    for half, key in enumerate(("chosen_ids", "rejected_ids")):
        for i, ex in enumerate(examples):
            r = half * b + i  # chosen rows first, then rejected, in the examples' order
            p, c = ex["prompt_ids"], ex[key]
            n = len(p) + len(c)
            assert batch["input_ids"][r, :n].tolist() == p + c
            assert batch["input_ids"][r, n:].eq(0).all()
            assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
            assert batch["completion_mask"][r].tolist() == [0] * len(p) + [1] * len(c) + [0] * (width - n)
    if with_ref:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            assert batch[key].dtype == torch.float32
            assert torch.equal(batch[key], torch.tensor([ex[key] for ex in examples], dtype=torch.float32))
    else:
        assert "ref_chosen_logps" not in batch


def test_collator_pad_multiple_and_errors():
    examples = _random_examples(3, with_ref=True)
    batch = PreferenceCollator(pad_token_id=7, pad_to_multiple_of=8)(examples)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width - 8 < max(example_length(ex) for ex in examples) <= width
    assert batch["input_ids"][batch["attention_mask"] == 0].eq(7).all()
    del examples[1]["ref_chosen_logps"]
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        PreferenceCollator(0)(examples)
    with pytest.raises(ValueError, match="examples"):
        PreferenceCollator(0)([])
    with pytest.raises(ValueError, match="pad_token_id"):
        PreferenceCollator(None)


def test_pipeline_log_probs_match_unpadded_float64(tok):
    """Collated, padded batch through a tiny Llama: completion log-probs equal per-example unpadded ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).double().eval()
    rows, _ = load_preference_rows(make_preference_dataset(5, fresh_seed()))
    examples, _ = tokenize_pairs(rows, tok)
    batch = PreferenceCollator(tok.pad_token_id)(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    seq_logps = (logp * batch["completion_mask"][:, 1:]).sum(-1)
    ref = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = torch.tensor([ex["prompt_ids"] + ex[key]])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            targets = ids[0, 1:]
            ref.append(lp.gather(-1, targets[:, None])[len(ex["prompt_ids"]) - 1:, 0].sum())
    ref = torch.stack(ref)
    assert torch.isfinite(seq_logps).all()
    torch.testing.assert_close(seq_logps, ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- batching / split


@pytest.mark.parametrize("n,bs,drop_last", [(1, 4, False), (37, 4, False), (100, 8, False), (37, 4, True)])
def test_length_grouped_batches_cover_every_index_once(n, bs, drop_last):
    lengths = torch.randint(1, 200, (n,)).tolist()
    sampler = LengthGroupedBatchSampler(lengths, bs, seed=fresh_seed(), drop_last=drop_last, mega_batch_mult=4)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    if drop_last:
        assert all(len(b) == bs for b in batches) and len(flat) == n - n % bs
        assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))
    else:
        assert flat == list(range(n)) and all(1 <= len(b) <= bs for b in batches)
    assert len(sampler) == len(batches)


def test_length_grouping_is_seeded_and_cuts_padding():
    n, bs = 200, 8
    lengths = torch.randint(1, 300, (n,)).tolist()
    seed = fresh_seed()
    a = LengthGroupedBatchSampler(lengths, bs, seed=seed)
    assert list(a) == list(LengthGroupedBatchSampler(lengths, bs, seed=seed))
    assert list(a) != list(LengthGroupedBatchSampler(lengths, bs, seed=seed + 1))
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0 and sorted(i for b in a for i in b) == list(range(n))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    order = list(range(n))
    random.Random(seed).shuffle(order)
    random_batches = [order[i:i + bs] for i in range(0, n, bs)]
    assert padding(e0) < padding(random_batches) / 4

    loader = torch.utils.data.DataLoader(list(range(n)), batch_sampler=a)
    assert sorted(int(x) for b in loader for x in b) == list(range(n))
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedBatchSampler(lengths, 0)


def test_split_eval_deterministic_and_disjoint():
    items = [f"x{i}" for i in range(101)]
    seed = fresh_seed()
    train, ev = split_eval(items, 0.2, seed=seed)
    assert (train, ev) == split_eval(items, 0.2, seed=seed)
    assert len(ev) == round(101 * 0.2) and sorted(train + ev) == sorted(items)
    assert train == [x for x in items if x in set(train)] and ev == [x for x in items if x in set(ev)]
    assert split_eval(items, 0.2, seed=seed + 1)[1] != ev
    assert split_eval(items, 0.0) == (items, [])
    assert len(split_eval(items[:3], 0.01)[1]) == 1 and len(split_eval(items[:2], 0.99)[0]) == 1
    for bad in (-0.1, 1.0, "0.5"):
        with pytest.raises(ValueError, match="eval_fraction"):
            split_eval(items, bad)


def test_dataset_dict_split_choice(tmp_path):
    import datasets

    rows = make_preference_dataset(6, fresh_seed())
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    got, _ = load_preference_rows(str(tmp_path / "dd"))
    assert [g["chosen"] for g in got] == [r["chosen"] for r in rows[:4]]
    only = datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[4:])})
    assert load_preference_rows(only)[1].n_kept == 2
    two = datasets.DatasetDict({"a": datasets.Dataset.from_list(rows[:2]), "b": datasets.Dataset.from_list(rows[2:])})
    with pytest.raises(ValueError, match="several splits"):
        load_preference_rows(two)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_preference_rows(str(tmp_path / "plain_dir"))


def test_empty_tokenized_completion_dropped_and_counted(tok):
    # rows passed directly (the loader would already have skipped the empty completion)
    rows = [{"prompt": "sort: 1 =", "chosen": " 1", "rejected": "", "row": 0},
            {"prompt": "sort: 2 =", "chosen": " 2", "rejected": " 3", "row": 1}]
    examples, report = tokenize_pairs(rows, tok, add_eos=False)
    assert [ex["row"] for ex in examples] == [1] and report.dropped_empty_completion == [0]
    assert report.n_kept + report.n_dropped == 2
    with pytest.raises(ValueError, match="rows: row 0"):
        tokenize_pairs([{"chosen": " a", "rejected": " b"}], tok)
