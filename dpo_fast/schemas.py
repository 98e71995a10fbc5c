"""The preference-data schemas people train on, mapped to the prompt / chosen / rejected rows of dpo_fast.data.

Recognised from a row's columns (or named with the column flags, `Columns`):

* TRL's formats (``trl-lib/ultrafeedback_binarized``: ``chosen`` / ``rejected`` message lists sharing the
  prompt turns) pass through unchanged; dpo_fast.data takes the shared leading turns as the prompt.
* ``prompt_and_messages`` (``HuggingFaceH4/ultrafeedback_binarized``): a ``prompt`` string plus ``chosen`` /
  ``rejected`` message lists that repeat the prompt turn; the shared turns become the prompt (their last user
  turn must be the ``prompt`` string), or, when the lists hold only the replies, the string becomes a user turn.
* ``anthropic_hh`` (Anthropic HH-RLHF): ``chosen`` / ``rejected`` raw text of ``\\n\\nHuman:`` /
  ``\\n\\nAssistant:`` turns; the prompt is the text up to and including the last ``\\n\\nAssistant:``, which
  both must share. The rows stay plain text (the format the dataset's models were trained on).
* ``system_question`` (Intel-Orca-style DPO pairs): ``system``, ``question``, ``chosen``, ``rejected``
  strings; they become a conversation (system turn when not empty, user turn, assistant replies) that goes
  through the tokenizer's chat template.

A system column (``system`` when present, or `Columns.system`) turns string rows into conversations and is
prepended to a message-list prompt that has no system turn. A row that does not fit raises `RowSchemaError`,
which dpo_fast.data reports with the row's line / index like any other bad row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
#: the prompt column of Orca-style pairs, used when a row has no ``prompt``
QUESTION_COLUMN = "question"


@dataclass(frozen=True)
class Columns:
    """Which column holds each field (None: the standard name, ``question`` standing in for a missing prompt)."""

    prompt: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    system: Optional[str] = None

    @property
    def names(self) -> dict:
        """The columns given explicitly, by field."""
        return {k: v for k, v in vars(self).items() if v is not None}


class RowSchemaError(Exception):
    """A row that does not fit its schema: `reason` is a short category, `message` says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    """How many leading items (turns, token ids) two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of an HH-RLHF pair: the prompt ends with the last ``\\n\\nAssistant:``."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowSchemaError("bad_schema", f"'chosen' has no {HH_ASSISTANT!r} turn")
    cut += len(HH_ASSISTANT)
    prompt = chosen[:cut]
    if not rejected.startswith(prompt) or HH_ASSISTANT in rejected[cut:]:
        raise RowSchemaError("prompt_mismatch", "'chosen' and 'rejected' do not share the conversation up to the "
                                                "last '\\n\\nAssistant:' turn")
    return prompt, chosen[cut:], rejected[cut:]


def _is_hh(chosen: Any, rejected: Any) -> bool:
    return all(isinstance(t, str) and HH_HUMAN in t and HH_ASSISTANT in t for t in (chosen, rejected))


def _prompt_and_messages(prompt: str, chosen: list, rejected: list) -> tuple[list, list, list]:
    """A prompt string plus message lists that repeat it (HuggingFaceH4/ultrafeedback_binarized)."""
    if chosen == rejected:
        raise RowSchemaError("identical_completions", "chosen == rejected")
    k = common_prefix_len(chosen, rejected)
    if k == 0:  # the lists hold the replies only
        return [{"role": "user", "content": prompt}], chosen, rejected
    shared = chosen[:k]
    users = [m for m in shared if m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str) or users[-1]["content"].strip() != prompt.strip():
        raise RowSchemaError("prompt_mismatch", "'prompt' is not the last user turn that 'chosen' and 'rejected' "
                                                "share")
    return shared, chosen[k:], rejected[k:]


def _with_system(row: dict, system: Any) -> dict:
    """The row as a conversation that starts with `system` (when not empty)."""
    if system is not None and not isinstance(system, str):
        raise RowSchemaError("non_string_content", f"'system' is {type(system).__name__}, not a string")
    system_turn = [{"role": "system", "content": system}] if system and system.strip() else []
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return dict(row, prompt=system_turn + [{"role": "user", "content": prompt}],
                    chosen=[{"role": "assistant", "content": chosen}],
                    rejected=[{"role": "assistant", "content": rejected}])
    if _is_messages(prompt):
        if prompt[0].get("role") == "system":
            return row
        return dict(row, prompt=system_turn + prompt)
    if prompt is None and _is_messages(chosen) and _is_messages(rejected):
        if chosen[0].get("role") == "system":
            return row
        return dict(row, chosen=system_turn + chosen, rejected=system_turn + rejected)
    raise RowSchemaError("bad_schema", "a system column needs a prompt string or message lists")


def to_preference_row(value: Any, columns: Optional[Columns] = None) -> tuple[Any, Optional[str]]:
    """The row with ``prompt`` / ``chosen`` / ``rejected`` in one of dpo_fast.data's formats, and the name of the
    schema it was mapped from (None: already in such a format). Other keys (``ref_*_logps``) are kept."""
    columns = columns or Columns()
    if not isinstance(value, dict):
        return value, None
    row = dict(value)
    for key, flag in (("prompt", "--prompt-column"), ("chosen", "--chosen-column"),
                      ("rejected", "--rejected-column"), ("system", "--system-column")):
        col = getattr(columns, key)
        if col is None or col == key:
            continue
        if col not in value:
            raise RowSchemaError("missing_key", f"missing column '{col}' ({flag})")
        row[key] = value[col]
    schema = None
    if columns.prompt is None and row.get("prompt") is None and QUESTION_COLUMN in row:
        row["prompt"] = row.pop(QUESTION_COLUMN)
        schema = "question"
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if prompt is None and _is_hh(chosen, rejected):
        row["prompt"], row["chosen"], row["rejected"] = split_hh(chosen, rejected)
        schema = "anthropic_hh"
    elif isinstance(prompt, str) and _is_messages(chosen) and _is_messages(rejected):
        row["prompt"], row["chosen"], row["rejected"] = _prompt_and_messages(prompt, chosen, rejected)
        schema = "prompt_and_messages"
    if "system" in row:
        if row.get("chosen") is None or row.get("rejected") is None:
            return row, schema  # dpo_fast.data reports the missing key
        row = _with_system(row, row.pop("system"))
        schema = "system_question" if schema in (None, "question") else schema
    return row, schema
