"""The real-world preference schemas: hand-written rows in each exact schema, checked by the token spans that
reach the collator (prompt / chosen / rejected), with bad rows reported by line."""
from __future__ import annotations

import json

import pytest

from dpo_fast.train.config import TrainConfig
from dpo_fast.train.trainer import DPOFastTrainer
from hf_fixtures import save_tiny_checkpoint, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema_ckpt")
    return save_tiny_checkpoint(path, tiny_tokenizer(path))


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def spans(checkpoint, tmp_path, rows, **options):
    """{source line: (prompt tokens, chosen tokens, rejected tokens)} as the collator lays the pairs out, and the
    trainer's log (load report)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    cfg = TrainConfig(model=checkpoint, data=str(path), output=str(tmp_path / "out"), device="cpu", patch=False,
                      max_length=128, progress=False, **options)
    trainer = DPOFastTrainer(cfg, log=logged.append).setup()
    examples = trainer.train_examples
    batch = trainer.collate(examples)
    tok = trainer.tokenizer
    out = {}
    b = len(examples)
    for i, ex in enumerate(examples):
        got = []
        for r in (i, b + i):
            n = int(batch["attention_mask"][r].sum())
            ids = batch["input_ids"][r, :n].tolist()
            mask = batch["completion_mask"][r, :n].tolist()
            start = mask.index(1)
            assert all(mask[start:]) and not any(mask[:start])
            got.append((tok.convert_ids_to_tokens(ids[:start]), tok.convert_ids_to_tokens(ids[start:])))
        assert got[0][0] == got[1][0]  # the chosen and rejected rows share the prompt
        out[ex["row"] + 1] = (got[0][0], got[0][1], got[1][1])
    return out, "\n".join(str(x) for x in logged)


def toks(text):
    return text.split()


def test_trl_lib_ultrafeedback_implicit_prompt(checkpoint, tmp_path):
    rows = [
        {"chosen": [_u("a b"), _a("c d")], "rejected": [_u("a b"), _a("e")], "score_chosen": 8.0,
         "score_rejected": 4.5},
        {"chosen": [_u("a"), _a("b"), _u("c"), _a("d")], "rejected": [_u("a"), _a("b"), _u("c"), _a("d e")],
         "score_chosen": 7.0, "score_rejected": 2.0},
        {"chosen": [_u("a"), _a("b")], "rejected": [_u("x"), _a("c")], "score_chosen": 1.0, "score_rejected": 0.0},
    ]
    got, log = spans(checkpoint, tmp_path, rows)
    assert got[1] == (toks("<bos> <|user|> a b <eos> <|assistant|>"), toks("c d <eos>"), toks("e <eos>"))
    assert got[2] == (toks("<bos> <|user|> a <eos> <|assistant|> b <eos> <|user|> c <eos> <|assistant|>"),
                      toks("d <eos>"), toks("d e <eos>"))
    assert set(got) == {1, 2}
    assert "line 3: implicit prompt: chosen and rejected share no leading message" in log


def test_h4_ultrafeedback_prompt_string_and_message_lists(checkpoint, tmp_path):
    def row(prompt, chosen, rejected):
        return {"prompt": prompt, "prompt_id": "0" * 64, "chosen": chosen, "rejected": rejected,
                "messages": chosen, "score_chosen": 9.0, "score_rejected": 3.0}

    rows = [
        row("a b", [_u("a b"), _a("c")], [_u("a b"), _a("d e")]),
        row(" a  ", [_u("a"), _a("b")], [_u("a"), _a("c")]),  # whitespace around the prompt string
        row("a", [_a("b")], [_a("c")]),  # the lists hold the replies only
        row("z", [_u("a"), _a("b")], [_u("a"), _a("c")]),  # prompt is not the shared turn
    ]
    got, log = spans(checkpoint, tmp_path, rows)
    assert got[1] == (toks("<bos> <|user|> a b <eos> <|assistant|>"), toks("c <eos>"), toks("d e <eos>"))
    assert got[2] == (toks("<bos> <|user|> a <eos> <|assistant|>"), toks("b <eos>"), toks("c <eos>"))
    assert got[3] == (toks("<bos> <|user|> a <eos> <|assistant|>"), toks("b <eos>"), toks("c <eos>"))
    assert set(got) == {1, 2, 3}
    assert "prompt_and_messages=3" in log
    assert "line 4: 'prompt' is not the last user turn that 'chosen' and 'rejected' share" in log


def test_anthropic_hh_raw_text(checkpoint, tmp_path):
    shared = "\n\nHuman: a b\n\nAssistant: c\n\nHuman: d\n\nAssistant:"
    rows = [
        # the answers share their first word: it belongs to the completions, not the prompt
        {"chosen": shared + " e f", "rejected": shared + " e g"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c d"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
    ]
    got, log = spans(checkpoint, tmp_path, rows)
    assert got[1] == (toks("<bos> Human: a b Assistant: c Human: d Assistant:"), toks("e f <eos>"),
                      toks("e g <eos>"))
    assert got[2] == (toks("<bos> Human: a Assistant:"), toks("b <eos>"), toks("c d <eos>"))
    assert set(got) == {1, 2}
    assert "anthropic_hh=2" in log
    assert "line 3: 'chosen' and 'rejected' do not share the conversation up to the last" in log


def test_intel_orca_system_question_pairs(checkpoint, tmp_path):
    rows = [
        {"system": "s t", "question": "a b", "chosen": "c", "rejected": "d e"},
        {"system": "", "question": "a", "chosen": "b c", "rejected": "d"},  # no system prompt: no system turn
        {"system": "s", "question": "a", "chosen": "b", "rejected": "b"},
    ]
    got, log = spans(checkpoint, tmp_path, rows)
    assert got[1] == (toks("<bos> <|system|> s t <eos> <|user|> a b <eos> <|assistant|>"), toks("c <eos>"),
                      toks("d e <eos>"))
    assert got[2] == (toks("<bos> <|user|> a <eos> <|assistant|>"), toks("b c <eos>"), toks("d <eos>"))
    assert set(got) == {1, 2}
    assert "system_question=2" in log and "line 3: chosen == rejected" in log


def test_column_flags_map_other_names(checkpoint, tmp_path):
    rows = [
        {"instruction": "a", "good": "b", "bad": "c d", "persona": "s"},
        {"instruction": "a b", "good": "c", "bad": "d", "persona": ""},
        {"instruction": "a", "better": "b", "bad": "c", "persona": "s"},
    ]
    got, log = spans(checkpoint, tmp_path, rows, prompt_column="instruction", chosen_column="good",
                     rejected_column="bad", system_column="persona")
    assert got[1] == (toks("<bos> <|system|> s <eos> <|user|> a <eos> <|assistant|>"), toks("b <eos>"),
                      toks("c d <eos>"))
    assert got[2] == (toks("<bos> <|user|> a b <eos> <|assistant|>"), toks("c <eos>"), toks("d <eos>"))
    assert set(got) == {1, 2}
    assert "line 3: missing column 'good' (--chosen-column)" in log


def test_plain_prompt_columns_stay_plain_text(checkpoint, tmp_path):
    """Without a system column, a renamed prompt keeps the standard (plain-text) format: BOS, no template."""
    rows = [{"q": "a b", "chosen": "c", "rejected": "d"}, {"q": "a", "chosen": "b c", "rejected": "b d"}]
    got, _ = spans(checkpoint, tmp_path, rows, prompt_column="q")
    assert got[1] == (toks("<bos> a b"), toks("c <eos>"), toks("d <eos>"))
    assert got[2] == (toks("<bos> a"), toks("b c <eos>"), toks("b d <eos>"))
