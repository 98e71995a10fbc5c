"""Preference data: load and check rows, tokenize pairs, collate batches, batch by length.

The pipeline is  `load_preference_rows` -> `tokenize_pairs` -> `LengthGroupedBatchSampler`
+ `PreferenceCollator`. It accepts TRL's preference formats and produces TRL's
preference-collator layout (docs/design.md, "Data layout"). Every step returns a report so that
no row is lost without a count and a reason.

Formats (per row, as TRL defines them):
  * standard: ``prompt``, ``chosen``, ``rejected`` strings;
  * implicit prompt: ``chosen`` and ``rejected`` only; their shared prefix becomes the prompt
    (characters for strings, whole messages for conversations), as TRL's `extract_prompt`;
  * conversational: the same keys holding lists of ``{"role", "content"}`` messages;
  * the published schemas of dpo_fast.schemas (HH-RLHF text, a prompt string with message
    lists, Orca-style system/question pairs, other column names), mapped to the above first.

Tokenization follows TRL 1.x's DPOTrainer: the prompt and prompt+completion are tokenized
(plain text with the tokenizer's own special tokens, e.g. BOS; conversations through the
chat template, the prompt with ``add_generation_prompt=True``) and the completion is what
follows the prompt's tokens. Plain-text completions get EOS appended; chat completions end
with whatever the template closes a turn with.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from dpo_fast.errors import UserError
from dpo_fast.schemas import Columns, RowSchemaError, common_prefix_len, to_preference_row

ON_BAD_ROW = ("skip", "error")
TRUNCATION_MODES = ("keep_end", "keep_start")
ROLES = ("system", "user", "assistant", "tool")
_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
_UTF8_BOM = b"\xef\xbb\xbf"


class BadRowError(UserError):
    """A malformed row (raised when ``on_bad_row="error"``); a ValueError, as every `UserError`."""


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


@dataclass
class BadRow:
    """A row that was not kept: where it is (``line N`` of a JSONL file, else ``row N``, 0-based) and why."""

    index: int  # 0-based position among the rows read
    location: str  # "line 7" (JSONL, 1-based line number) or "row 6" (0-based index)
    reason: str  # short category, e.g. "missing_key"
    message: str  # human-readable detail

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass
class LoadReport:
    """What `load_preference_rows` read, kept and skipped, and why."""

    source: str
    n_read: int = 0
    n_kept: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)  # kept rows per format
    blank_lines: int = 0  # empty lines of a JSONL file (not rows)

    @property
    def n_skipped(self) -> int:
        return len(self.bad_rows)

    @property
    def reasons(self) -> Counter:
        """Skipped rows per reason category."""
        return Counter(b.reason for b in self.bad_rows)

    def summary(self, max_listed: int = 10) -> str:
        """A few lines for the console: counts, formats, reasons and the first bad rows."""
        lines = [f"{self.source}: read {self.n_read} rows, kept {self.n_kept}, skipped {self.n_skipped}"]
        if self.formats:
            lines.append("  formats: " + ", ".join(f"{k}={v}" for k, v in sorted(self.formats.items())))
        if self.bad_rows:
            lines.append("  skipped by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items())))
            for bad in self.bad_rows[:max_listed]:
                lines.append(f"    {bad}")
            if self.n_skipped > max_listed:
                lines.append(f"    ... and {self.n_skipped - max_listed} more")
        return "\n".join(lines)


@dataclass
class TokenizeReport:
    """What `tokenize_pairs` kept, truncated and dropped (dropped pairs by "row" id and by source location)."""

    n_in: int = 0
    n_kept: int = 0
    dropped_prompt_too_long: list[int] = field(default_factory=list)  # "row" ids of dropped pairs
    n_prompt_truncated: int = 0
    n_completion_truncated: int = 0  # pairs with at least one completion cut to fit max_length
    n_prefix_mismatch: int = 0  # prompt tokens were not a prefix of prompt+completion tokens
    dropped_identical_after_truncation: list[int] = field(default_factory=list)  # cut to chosen == rejected
    dropped_empty_completion: list[int] = field(default_factory=list)  # a completion tokenized to nothing
    max_length: Optional[int] = None
    locations: dict[int, str] = field(default_factory=dict)  # "row" id -> "line 7" / "row 6", for dropped pairs

    @property
    def n_dropped(self) -> int:
        return (
            len(self.dropped_prompt_too_long)
            + len(self.dropped_identical_after_truncation)
            + len(self.dropped_empty_completion)
        )

    def where(self, row_ids: Sequence[int], max_listed: int = 5) -> str:
        """The first `max_listed` locations of `row_ids`, e.g. "line 3, line 9, ... and 4 more"."""
        shown = [self.locations.get(r, f"row {r}") for r in row_ids[:max_listed]]
        more = len(row_ids) - len(shown)
        return ", ".join(shown) + (f", ... and {more} more" if more > 0 else "")

    def summary(self, max_listed: int = 5) -> str:
        """One line for the console (plus one line per kind of dropped pair, naming where they are)."""
        text = (
            f"tokenized {self.n_in} pairs: kept {self.n_kept}, dropped {len(self.dropped_prompt_too_long)} whose "
            f"prompt alone is >= max_length={self.max_length}; truncated prompts {self.n_prompt_truncated}, "
            f"truncated completions {self.n_completion_truncated}"
        )
        if self.dropped_identical_after_truncation:
            text += (
                f"; dropped {len(self.dropped_identical_after_truncation)} whose completions became "
                "identical after truncation"
            )
        if self.dropped_empty_completion:
            text += f"; dropped {len(self.dropped_empty_completion)} with a completion that tokenized to nothing"
        if self.n_prefix_mismatch:
            text += f"; {self.n_prefix_mismatch} pairs re-tokenized because the prompt tokens changed when joined"
        for label, ids in (
            ("prompt alone >= max_length (raise --max-length or set --max-prompt-length to truncate prompts)",
             self.dropped_prompt_too_long),
            ("completions identical after truncation", self.dropped_identical_after_truncation),
            ("a completion tokenized to nothing", self.dropped_empty_completion),
        ):
            if ids:
                text += f"\n  dropped, {label}: {self.where(ids, max_listed)}"
        return text


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------


@dataclass
class _RawRow:
    index: int
    location: str
    value: Any = None
    error: Optional[tuple[str, str]] = None  # (reason, message) when the row could not even be parsed


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes of the line without its line break), as text mode would number them.

    Bytes, not text: one undecodable byte must cost its own line only. Lines end at ``\\n``,
    ``\\r\\n`` or ``\\r``; a UTF-8 byte-order mark at the start of the file is dropped.
    """
    lineno = 0
    with path.open("rb") as f:
        for chunk in f:
            if lineno == 0 and chunk.startswith(_UTF8_BOM):
                chunk = chunk[len(_UTF8_BOM):]
            for line in chunk.splitlines():
                lineno += 1
                yield lineno, line


def _decode_line(line: bytes) -> tuple[Optional[str], str]:
    """(text, "") or (None, what is wrong) for one line of a UTF-8 file."""
    try:
        return line.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, (f"not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line); "
                      "re-save the file as UTF-8")


def _iter_jsonl(path: Path, report: LoadReport) -> Iterator[_RawRow]:
    index = 0
    for lineno, raw_line in _jsonl_lines(path):
        line, problem = _decode_line(raw_line)
        if line is not None and not line.strip():
            report.blank_lines += 1
            continue
        location = f"line {lineno}"
        if line is None:
            raw = _RawRow(index, location, error=("invalid_utf8", problem))
        else:
            try:
                raw = _RawRow(index, location, json.loads(line))
            except json.JSONDecodeError as e:
                raw = _RawRow(index, location, error=("invalid_json", f"invalid JSON ({e.msg})"))
        index += 1
        yield raw


def _read_json_text(path: Path) -> Optional[str]:
    """A .json file's text (a leading BOM dropped), or None when a byte is not UTF-8 (read it per line then).

    A file that is one JSON document (not JSON lines) with an undecodable byte raises a ValueError
    naming the line: its rows cannot be told apart, so the bad one cannot be skipped alone.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        try:
            json.loads(data.decode("utf-8-sig", errors="replace"))
        except json.JSONDecodeError:
            return None  # JSON lines in a .json file: each line is decoded (and reported) on its own
        raise ValueError(
            f"source: {path}, line {lineno}: not valid UTF-8 (byte 0x{data[e.start]:02x}); the file is one JSON "
            "document, so the row cannot be skipped alone: re-save the file as UTF-8"
        ) from None


def _iter_values(values: Iterable[Any]) -> Iterator[_RawRow]:
    for i, value in enumerate(values):
        yield _RawRow(i, f"row {i}", value)


def _pick_split(dataset: Any, what: str) -> Any:
    """The split to use from a DatasetDict: "train" if present, else the only one."""
    splits = list(dataset.keys())
    if "train" in splits:
        return dataset["train"]
    if len(splits) == 1:
        return dataset[splits[0]]
    raise ValueError(f"source: {what} holds several splits {splits} and none is named 'train'; pass one split")


def _open_source(source: Any, report: LoadReport) -> Iterator[_RawRow]:
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"source: no such file or directory: {path}")
        if path.is_dir():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError:
                raise UserError(f"source: {path} is a folder but not a dataset saved by datasets' save_to_disk; "
                                "give a .jsonl, .json or .parquet file, or a save_to_disk folder") from None
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, str(path))
            return _iter_values(ds)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _iter_jsonl(path, report)
        if suffix == ".json":
            text = _read_json_text(path)
            if text is None:
                return _iter_jsonl(path, report)
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return _iter_jsonl(path, report)  # a JSON-lines file named .json
            if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
                value = next(iter(value.values()))  # {"train": [...]} / {"data": [...]}
            if not isinstance(value, list):
                raise ValueError(f"source: {path} holds a JSON {type(value).__name__}; expected a list of row objects")
            return _iter_values(value)
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return _iter_values(pq.read_table(str(path)).to_pylist())
        raise UserError(f"source: unsupported file type {suffix!r} ({path}); use .jsonl, .json, .parquet or a saved dataset dir")
    try:
        import datasets

        if isinstance(source, datasets.DatasetDict):
            return _iter_values(_pick_split(source, "the DatasetDict"))
        if isinstance(source, datasets.Dataset):
            return _iter_values(source)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(source, (list, tuple)):
        return _iter_values(source)
    raise TypeError(
        f"source: expected a path, a datasets.Dataset or a list of dicts, got {type(source).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Checking one row
# --------------------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _check_messages(messages: Any, key: str) -> list[dict]:
    if isinstance(messages, list) and not messages and key != "prompt":
        raise _Bad("empty_completion", f"'{key}' is an empty list of messages")
    if not isinstance(messages, list) or not messages:
        raise _Bad("bad_roles", f"'{key}' must be a non-empty list of messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _Bad("bad_roles", f"'{key}'[{j}] is not a {{'role', 'content'}} message")
        if m["role"] not in ROLES:
            raise _Bad("bad_roles", f"'{key}'[{j}] has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise _Bad("non_string_content", f"'{key}'[{j}] content is {type(m['content']).__name__}, not a string")
        out.append(dict(m))
    return out


def _check_conversational(row: dict) -> tuple[dict, str]:
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], list):
            raise _Bad("non_string_content", f"'{key}' is {type(row[key]).__name__} while other fields are message lists")
    chosen = _check_messages(row["chosen"], "chosen")
    rejected = _check_messages(row["rejected"], "rejected")
    if chosen == rejected:
        raise _Bad("identical_completions", "chosen == rejected")
    if row.get("prompt") is not None:
        if not isinstance(row["prompt"], list):
            raise _Bad("non_string_content", f"'prompt' is {type(row['prompt']).__name__} while chosen/rejected are message lists")
        prompt = _check_messages(row["prompt"], "prompt")
        fmt = "conversational"
    else:  # implicit prompt: the shared leading messages
        k = common_prefix_len(chosen, rejected)
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            raise _Bad("bad_roles", "implicit prompt: chosen and rejected share no leading message")
        fmt = "conversational_implicit_prompt"
    if prompt[-1]["role"] == "assistant":
        raise _Bad("bad_roles", "prompt ends with an assistant message")
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise _Bad("empty_completion", f"'{key}' has no messages after the prompt")
        if completion[0]["role"] != "assistant" or completion[-1]["role"] != "assistant":
            raise _Bad("bad_roles", f"'{key}' must start and end with an assistant message")
        if not completion[-1]["content"].strip():
            raise _Bad("empty_completion", f"'{key}' ends with an empty assistant message")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, fmt


def _check_standard(row: dict) -> tuple[dict, str]:
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], str):
            raise _Bad("non_string_content", f"'{key}' is {type(row[key]).__name__}, not a string")
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen == rejected:
        raise _Bad("identical_completions", "chosen == rejected")
    if row.get("prompt") is not None:
        if not isinstance(row["prompt"], str):
            raise _Bad("non_string_content", f"'prompt' is {type(row['prompt']).__name__}, not a string")
        prompt, fmt = row["prompt"], "standard"
    else:  # implicit prompt: the shared leading characters; a space before the split goes to the completions
        k = common_prefix_len(chosen, rejected)
        if k > 0 and chosen[k - 1] == " ":
            k -= 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        fmt = "implicit_prompt"
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion.strip():
            raise _Bad("empty_completion", f"'{key}' is empty")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, fmt


def _check_row(value: Any, source_row: Any = None) -> tuple[dict, str]:
    """Normalize one row to explicit prompt/chosen/rejected, or raise _Bad.

    `source_row`: the row as read, before a schema mapped it (a missing key names the columns it has)."""
    if not isinstance(value, dict):
        raise _Bad("not_an_object", f"row is a {type(value).__name__}, not an object")
    shown = source_row if isinstance(source_row, dict) else value
    for key in ("chosen", "rejected"):
        if value.get(key) is None:
            raise _Bad("missing_key", f"missing key '{key}' (the row has {sorted(map(str, shown))[:8]})")
    values = [value["chosen"], value["rejected"]] + ([value["prompt"]] if value.get("prompt") is not None else [])
    if any(_is_messages(v) for v in values):
        out, fmt = _check_conversational(value)
    else:
        out, fmt = _check_standard(value)
    refs = [value.get(k) for k in _REF_KEYS]
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in refs):
        out.update({k: float(r) for k, r in zip(_REF_KEYS, refs)})
    return out, fmt


def load_preference_rows(source: Any, *, on_bad_row: str = "skip", columns: Optional[Columns] = None,
                         name: Optional[str] = None) -> tuple[list[dict], LoadReport]:
    """Read preference rows from a file, a saved dataset dir, a Dataset or a list of dicts.

    Rows in the schemas of dpo_fast.schemas (HH-RLHF text, a prompt string with message lists, Orca-style
    system/question pairs) are mapped first; `columns` names the columns when they differ from the
    standard ones. `name` labels the source in the report (default: the path, else the type).

    Returns rows normalized to an explicit ``prompt`` (implicit prompts extracted) with
    ``chosen``/``rejected``, plus ``row`` (the 0-based index of the source row), ``location``
    (where it is: ``"line 7"`` of a JSONL file, else ``"row 6"``) and, when the
    source has finite numbers for both, ``ref_chosen_logps``/``ref_rejected_logps``.
    Malformed rows are skipped and listed in the report (``on_bad_row="skip"``) or raise
    `BadRowError` (a ValueError) naming the line/row and the reason (``"error"``).
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row: expected one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"
    report = LoadReport(source=name)
    rows: list[dict] = []
    for raw in _open_source(source, report):
        report.n_read += 1
        try:
            if raw.error is not None:
                raise _Bad(*raw.error)
            try:
                value, schema = to_preference_row(raw.value, columns)
            except RowSchemaError as e:
                raise _Bad(e.reason, e.message) from None
            row, fmt = _check_row(value, raw.value)
            fmt = schema or fmt
        except _Bad as bad:
            if on_bad_row == "error":
                raise BadRowError(f"{name}, {raw.location}: {bad.message} (on_bad_row='error': fix or remove the row, "
                                  "or skip bad rows with on_bad_row='skip', --on-bad-row skip)") from None
            report.bad_rows.append(BadRow(raw.index, raw.location, bad.reason, bad.message))
            continue
        row["row"] = raw.index
        row["location"] = raw.location
        rows.append(row)
        report.formats[fmt] += 1
    report.n_kept = len(rows)
    return rows, report


def require_rows(report: LoadReport, *, what: str = "data") -> None:
    """Raise `UserError` when `load_preference_rows` kept no row: the source is empty, or every row is bad
    (one line: how many, why, the first bad row, and the columns a row needs). `what` names the option that
    gave the source (``data``, ``eval_data``)."""
    if report.n_kept:
        return
    if report.n_read == 0:
        raise UserError(f"{what}: {report.source} holds no rows; give a file with one preference pair "
                        "(prompt, chosen, rejected) per row")
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.reasons.items()))
    raise UserError(f"{what}: none of the {report.n_read} rows of {report.source} is usable ({reasons}; first: "
                    f"{report.bad_rows[0]}); each row needs 'prompt', 'chosen' and 'rejected' (strings or message "
                    "lists), or 'chosen' and 'rejected' conversations sharing their first messages; name other "
                    "columns with --prompt-column / --chosen-column / --rejected-column")


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


def _ids(encoded: Any) -> list[int]:
    """input_ids of a tokenizer/apply_chat_template result (dict-like or a plain list)."""
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return list(ids)


def _chat_ids(tokenizer: Any, messages: list, add_generation_prompt: bool) -> list[int]:
    return _ids(
        tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
        )
    )


def _chat_text(tokenizer: Any, messages: list, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _split_completion(
    tokenizer: Any, prompt_ids: list[int], joined_ids: list[int], prompt: Any, completion: Any
) -> tuple[list[int], bool]:
    """The completion's tokens: what follows the prompt's tokens in the joined tokenization.

    If the prompt's tokens are not a prefix of the joined ones (a merge across the boundary),
    the completion is tokenized on its own instead; the flag reports it.
    """
    n = len(prompt_ids)
    if joined_ids[:n] == prompt_ids:
        return joined_ids[n:], False
    if isinstance(prompt, list):
        full = _chat_text(tokenizer, prompt + completion, False)
        head = _chat_text(tokenizer, prompt, True)
        rest = full[len(head):] if full.startswith(head) else full
        return _ids(tokenizer(rest, add_special_tokens=False)), True
    return _ids(tokenizer(completion, add_special_tokens=False)), True


def _truncate_prompt(ids: list[int], limit: int, mode: str, bos_id: Optional[int]) -> list[int]:
    if len(ids) <= limit:
        return ids
    if mode == "keep_start":
        return ids[:limit]
    if bos_id is not None and ids and ids[0] == bos_id and limit > 1:  # keep BOS, then the end
        return ids[:1] + ids[len(ids) - (limit - 1):]
    return ids[len(ids) - limit:]


def tokenize_pairs(
    rows: Sequence[dict],
    tokenizer: Any,
    *,
    max_length: Optional[int] = 1024,
    max_prompt_length: Optional[int] = None,
    truncation_mode: str = "keep_end",
    add_eos: bool = True,
) -> tuple[list[dict], TokenizeReport]:
    """Tokenize rows from `load_preference_rows` into prompt_ids / chosen_ids / rejected_ids.

    Plain text: ``tokenizer(prompt)`` and ``tokenizer(prompt + completion)`` with the
    tokenizer's special tokens (BOS as it adds it); the completion is the tail after the
    prompt's tokens, with EOS appended when `add_eos` and it is not already there (TRL 1.x).
    Conversations: the chat template, the prompt with ``add_generation_prompt=True``.

    Truncation: with `max_prompt_length` the prompt keeps its end (``"keep_end"``, BOS kept)
    or its start (``"keep_start"``); pairs whose prompt alone is ``>= max_length`` are dropped
    and counted; completions are cut so prompt + completion <= `max_length` (pairs whose
    completions become identical by that cut are dropped and counted too); the report names
    where each dropped pair came from (the rows' ``location``: a JSONL line, else the row index).
    Examples also carry ``row`` and any ``ref_*_logps`` of their input row.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode: expected one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length: must be < max_length ({max_prompt_length} >= {max_length})")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos_id is None:
        raise ValueError("tokenizer: add_eos=True but the tokenizer has no eos_token_id")
    bos_id = getattr(tokenizer, "bos_token_id", None)

    report = TokenizeReport(n_in=len(rows), max_length=max_length)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in ("prompt", "chosen", "rejected")):
            raise ValueError(
                f"rows: row {i} lacks prompt/chosen/rejected; pass the rows returned by load_preference_rows"
            )
    conv = [isinstance(r["prompt"], list) for r in rows]
    if any(conv) and not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer: conversational rows need a tokenizer with a chat_template")

    # Plain-text rows are tokenized in three batched calls.
    plain = [i for i, c in enumerate(conv) if not c]
    plain_ids: dict[int, tuple[list[int], list[int], list[int]]] = {}
    if plain:
        prompts = [rows[i]["prompt"] for i in plain]
        p = tokenizer(prompts)["input_ids"]
        pc = tokenizer([rows[i]["prompt"] + rows[i]["chosen"] for i in plain])["input_ids"]
        pr = tokenizer([rows[i]["prompt"] + rows[i]["rejected"] for i in plain])["input_ids"]
        for j, i in enumerate(plain):
            plain_ids[i] = (list(p[j]), list(pc[j]), list(pr[j]))

    examples: list[dict] = []

    def drop(into: list[int], i: int, row: dict) -> None:
        row_id = row.get("row", i)
        into.append(row_id)
        report.locations[row_id] = row.get("location") or f"row {row_id}"

    for i, row in enumerate(rows):
        if conv[i]:
            prompt_ids = _chat_ids(tokenizer, row["prompt"], True)
            joined_c = _chat_ids(tokenizer, row["prompt"] + row["chosen"], False)
            joined_r = _chat_ids(tokenizer, row["prompt"] + row["rejected"], False)
        else:
            prompt_ids, joined_c, joined_r = plain_ids[i]
        chosen_ids, mis_c = _split_completion(tokenizer, prompt_ids, joined_c, row["prompt"], row["chosen"])
        rejected_ids, mis_r = _split_completion(tokenizer, prompt_ids, joined_r, row["prompt"], row["rejected"])
        report.n_prefix_mismatch += int(mis_c or mis_r)
        if add_eos and not conv[i]:
            chosen_ids = chosen_ids if chosen_ids[-1:] == [eos_id] else chosen_ids + [eos_id]
            rejected_ids = rejected_ids if rejected_ids[-1:] == [eos_id] else rejected_ids + [eos_id]

        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = _truncate_prompt(prompt_ids, max_prompt_length, truncation_mode, bos_id)
            report.n_prompt_truncated += 1
        if max_length is not None:
            if len(prompt_ids) >= max_length:
                drop(report.dropped_prompt_too_long, i, row)
                continue
            room = max_length - len(prompt_ids)
            if len(chosen_ids) > room or len(rejected_ids) > room:
                report.n_completion_truncated += 1
                chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
                if chosen_ids == rejected_ids:  # no preference left to learn from
                    drop(report.dropped_identical_after_truncation, i, row)
                    continue
        if not chosen_ids or not rejected_ids:
            drop(report.dropped_empty_completion, i, row)
            continue
        example = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "row": row.get("row", i)}
        for key in _REF_KEYS:
            if key in row:
                example[key] = row[key]
        examples.append(example)
    report.n_kept = len(examples)
    return examples, report


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def example_length(example: dict) -> int:
    """Padded row length an example needs: prompt + the longer completion."""
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


class PreferenceCollator:
    """Examples -> TRL's preference-collator batch (docs/design.md, "Data layout"), right-padded.

    ``input_ids`` [2B, T]: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, in the
    examples' order; ``attention_mask`` 1 on real tokens; ``completion_mask`` 1 exactly on
    completion tokens. ``ref_chosen_logps``/``ref_rejected_logps`` [B] float32 when the
    examples carry them (all or none).
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: Optional[int] = None):
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: expected a non-negative int, got {pad_token_id!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples: cannot collate an empty batch")
        seqs, comp_lens = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                seqs.append(list(ex["prompt_ids"]) + list(ex[key]))
                comp_lens.append(len(ex[key]))
        width = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(seqs)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        completion_mask = torch.zeros((n, width), dtype=torch.long)
        for r, (seq, c) in enumerate(zip(seqs, comp_lens)):
            input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[r, : len(seq)] = 1
            completion_mask[r, len(seq) - c : len(seq)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        for key in _REF_KEYS:
            present = [key in ex for ex in examples]
            if any(present):
                if not all(present):
                    raise ValueError(f"examples: {key} is present in some examples but not all")
                batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------------------------
# Batching and splitting
# --------------------------------------------------------------------------------------------


class LengthGroupedBatchSampler:
    """Batches of indices with similar lengths, in a seeded random order.

    Indices are shuffled (seed, epoch), cut into mega-batches of ``batch_size * mega_batch_mult``,
    each sorted by length (longest first) and cut into batches; the batch order is shuffled
    again. Every index appears exactly once per epoch; the same (seed, epoch) gives the same
    batches. Usable as a `torch.utils.data.DataLoader` ``batch_sampler``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
        mega_batch_mult: int = 50,
    ):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(mega_batch_mult, int) or mega_batch_mult < 1:
            raise ValueError(f"mega_batch_mult: expected a positive int, got {mega_batch_mult!r}")
        self.lengths = [int(x) for x in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use a different (still deterministic) order for each epoch."""
        self.epoch = int(epoch)

    def batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """The batches of one epoch (default: the current one)."""
        rng = random.Random(f"{self.seed}:{self.epoch if epoch is None else epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * self.mega_batch_mult
        out: list[list[int]] = []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            out.extend(group[j : j + self.batch_size] for j in range(0, len(group), self.batch_size))
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def split_eval(items: Sequence[Any], eval_fraction: float, *, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(train, eval): a seeded random `eval_fraction` of `items` held out, both in original order.

    At least one item goes to eval when the fraction is > 0, and at least one stays in train.
    """
    if not isinstance(eval_fraction, (int, float)) or not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: expected a number in [0, 1), got {eval_fraction!r}")
    n = len(items)
    if eval_fraction == 0 or n == 0:
        return list(items), []
    if n < 2:
        raise ValueError(f"items: need at least 2 items to hold out an eval split, got {n}")
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
