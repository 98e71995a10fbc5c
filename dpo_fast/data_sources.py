"""Where the preference rows come from: local files, saved datasets, dataset repo folders and Hub dataset ids.

Local files (JSONL, JSON, Parquet) and `save_to_disk` folders are read by dpo_fast.data as before. A folder
laid out like a dataset repository (``data/train_prefs-00000-of-00001.parquet``, ...) and a Hub dataset id
(``trl-lib/ultrafeedback_binarized``) go through `datasets.load_dataset` with the split, configuration and
revision given, so its cache and offline mode apply. The train / eval sources of a run are chosen here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dpo_fast import hub
from dpo_fast.errors import UserError

#: suffixes of the data files dpo_fast.data reads; a missing path with one of them is a missing file, not a Hub id
DATA_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv", ".arrow")
DEFAULT_SPLIT = "train"


@dataclass
class DataSource:
    """One dataset to read: `spec` (path, Hub id or rows) and how to pick from it."""

    spec: Any
    split: Optional[str] = None
    config: Optional[str] = None
    revision: Optional[str] = None
    flag: str = "--data"
    split_flag: str = "--data-split"

    @property
    def label(self) -> str:
        """How reports name it: ``org/name[train_prefs]`` or the path."""
        if not isinstance(self.spec, (str, Path)):
            return f"<{type(self.spec).__name__}>"
        extra = ":".join(x for x in (self.config, self.split) if x)
        return f"{self.spec}[{extra}]" if extra else str(self.spec)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def is_hub_dataset_id(spec: Any) -> bool:
    """A Hub dataset id: names no local path, is a valid repo id and does not end like a data file."""
    return hub.is_hub_id(spec) and not str(spec).lower().endswith(DATA_FILE_SUFFIXES)


def _pick(dataset: Any, src: DataSource) -> Any:
    """The split `src` names from a DatasetDict (default: "train", or the only one)."""
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        if src.split is not None:
            raise UserError(f"{src.split_flag}: {src.spec} holds a single dataset without splits; drop "
                            f"{src.split_flag}")
        return dataset
    splits = list(dataset.keys())
    name = src.split or (DEFAULT_SPLIT if DEFAULT_SPLIT in splits or len(splits) != 1 else splits[0])
    if name not in splits:
        raise UserError(f"{src.split_flag}: {src.spec} has no split {name!r}; its splits are {splits}"
                        + ("" if src.split else f"; pick one with {src.split_flag}"))
    return dataset[name]


def _load_dataset(src: DataSource, path: str) -> Any:
    """`datasets.load_dataset` of a Hub id or a dataset repo folder, its errors as one-line UserErrors."""
    import datasets

    kwargs: dict = {"split": src.split or DEFAULT_SPLIT}
    if src.config is not None:
        kwargs["name"] = src.config
    if src.revision is not None:
        kwargs["revision"] = src.revision
    try:
        return datasets.load_dataset(path, **kwargs)
    except ValueError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if text.startswith("Unknown split"):
            hint = "" if src.split else f" (no split given, so {DEFAULT_SPLIT!r} was asked for)"
            raise UserError(f"{src.split_flag}: {src.spec}: {text}{hint}; pick one with {src.split_flag}") from exc
        if "BuilderConfig" in text or "Config name is missing" in text:
            raise UserError(f"--data-config: {src.spec}: {text}") from exc
        error = hub.hub_user_error(exc, path, flag=src.flag, revision=src.revision, kind="dataset")
        if error is None:
            raise
        raise error from exc
    except OSError as exc:  # ConnectionError (unreachable Hub), a missing repository, ...
        if not is_hub_dataset_id(path):
            raise
        error = hub.hub_user_error(exc, path, flag=src.flag, revision=src.revision, kind="dataset")
        if error is None:
            raise
        raise error from exc


def open_source(src: DataSource) -> Any:
    """What dpo_fast.data.load_preference_rows reads for `src`: a file path, a Dataset, or the rows as given."""
    spec = src.spec
    if not isinstance(spec, (str, Path)):
        if src.split is not None or src.config is not None:
            import datasets

            if isinstance(spec, datasets.DatasetDict):
                return _pick(spec, src)
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            import datasets

            return _pick(datasets.load_from_disk(str(path)), src)
        return _load_dataset(src, str(path))
    if path.exists() or not is_hub_dataset_id(str(spec)):
        for value, flag in ((src.split, src.split_flag), (src.config, "--data-config"),
                            (src.revision, "--data-revision")):
            if value is not None:
                raise UserError(f"{flag}: {spec} is a file; splits, configurations and revisions belong to a Hub "
                                "dataset id or a dataset folder")
        return str(path) if path.exists() else spec  # a missing file is reported by dpo_fast.data
    return _load_dataset(src, str(spec))


def train_and_eval_sources(data: Any, *, data_split: Optional[str] = None, data_config: Optional[str] = None,
                           data_revision: Optional[str] = None, eval_data: Any = None,
                           eval_split: Optional[str] = None) -> tuple[DataSource, Optional[DataSource]]:
    """The training source and the separate eval source (None: no separate one; --eval-fraction may hold out).

    `eval_data` names another dataset (its split `eval_split`); `eval_split` alone is another split of `data`
    (e.g. ``test_prefs`` beside ``train_prefs``). The configuration and revision of `data` apply to the eval
    set when it is the same dataset.
    """
    train = DataSource(data, data_split, data_config, data_revision)
    if eval_data is None and eval_split is None:
        return train, None
    same = eval_data is None or eval_data == data
    evals = DataSource(data if eval_data is None else eval_data, eval_split, data_config if same else None,
                       data_revision if same else None, flag="--eval-data" if eval_data is not None else "--data",
                       split_flag="--eval-split")
    if same and (evals.split or DEFAULT_SPLIT) == (train.split or DEFAULT_SPLIT):
        raise UserError(f"--eval-split: the eval split {evals.split or DEFAULT_SPLIT!r} is the training split of "
                        f"{data}; pick another (e.g. test_prefs) or hold out a part with --eval-fraction")
    return train, evals
