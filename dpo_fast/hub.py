"""Hugging Face Hub ids for the model, tokenizer and adapter: loaded through the libraries' own `from_pretrained`.

A name that is not a local path but is a valid Hub repository id (``org/name``) is handed to
transformers / peft as it is, so their cache (``HF_HOME``), offline mode (``HF_HUB_OFFLINE``), tokens and
``revision`` work as users expect. What can go wrong on the way (not cached while offline, no such
repository, a gated one, an unknown revision) becomes one `UserError` line that names the id and what to do.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional

from dpo_fast.errors import UserError


def is_hub_id(spec: Any) -> bool:
    """True for a string that names no local file or folder and is a valid Hub repo id (``name``, ``org/name``)."""
    if not isinstance(spec, str) or not spec or os.path.exists(os.path.expanduser(spec)):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _label(repo_id: str, revision: Optional[str]) -> str:
    return f"'{repo_id}'" + (f" (revision {revision!r})" if revision else "")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes / contexts (the libraries wrap the hub's errors in OSError / ValueError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _offline_reason() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "no network connection"


def hub_user_error(exc: BaseException, repo_id: str, *, flag: str, revision: Optional[str] = None,
                   kind: str = "model") -> Optional[UserError]:
    """The one-line UserError for a failed Hub load, or None when `exc` is not a Hub lookup problem."""
    from huggingface_hub import constants, errors

    chain = list(_chain(exc))
    what = f"{flag}: {_label(repo_id, revision)}"
    hf_cli = f"hf download {repo_id}" + (" --repo-type dataset" if kind == "dataset" else "") \
        + (f" --revision {revision}" if revision else "")

    def has(*types: type) -> bool:
        return any(isinstance(e, types) for e in chain)

    if has(errors.GatedRepoError):
        return UserError(f"{what} is a gated {kind} repository: accept its terms on huggingface.co and log in "
                         "(`hf auth login` or HF_TOKEN)")
    if has(errors.RevisionNotFoundError):
        return UserError(f"{what}: no such revision on the Hub; pass an existing branch, tag or commit to "
                         f"{'--data-revision' if kind == 'dataset' else '--revision'}")
    if has(errors.RepositoryNotFoundError) or any(type(e).__name__ == "DatasetNotFoundError" for e in chain):
        return UserError(f"{what} is neither a local path nor a {kind} repository on the Hub (a private one "
                         "needs `hf auth login` or HF_TOKEN); check the spelling")
    if has(errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError):
        return UserError(f"{what} is not a local path and not in the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}), and the Hub is unreachable ({_offline_reason()}); "
                         f"download it once with network access (`{hf_cli}`) or pass a local folder")
    return None


@contextlib.contextmanager
def hub_errors(spec: Any, *, flag: str, revision: Optional[str] = None, kind: str = "model") -> Iterator[None]:
    """Turn a Hub lookup failure of `spec` (when it is a Hub id) into its one-line UserError."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, UserError) or not is_hub_id(spec):
            raise
        error = hub_user_error(exc, spec, flag=flag, revision=revision, kind=kind)
        if error is None:
            raise
        raise error from exc


def from_pretrained(loader: Callable[..., Any], spec: str, *, flag: str, revision: Optional[str] = None,
                    trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """`loader(spec, ...)` (a `from_pretrained`) for a local folder or a Hub id, with `revision` for a Hub id."""
    if is_hub_id(spec) and revision is not None:
        kwargs["revision"] = revision
    with hub_errors(spec, flag=flag, revision=revision):
        return loader(spec, trust_remote_code=trust_remote_code, **kwargs)


def snapshot_commit(repo_id: str, filename: str, *, flag: str, revision: Optional[str] = None) -> str:
    """The commit hash a Hub id (at `revision`) resolves to, from its cached `filename` (the cache when offline).

    A cached file lies in ``snapshots/<commit>/<filename>``, so this names the exact files that were loaded.
    """
    from pathlib import PurePath

    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id, flag=flag, revision=revision):
        path = PurePath(hf_hub_download(repo_id, filename, revision=revision))
    return path.parents[len(PurePath(filename).parts) - 1].name


def identity(repo_id: str, filename: str, *, flag: str, revision: Optional[str] = None) -> str:
    """A stable identity of a Hub checkpoint or adapter: ``hub:org/name@<commit>``."""
    return f"hub:{repo_id}@{snapshot_commit(repo_id, filename, flag=flag, revision=revision)}"


def _snapshot_cached(repo_id: str, revision: Optional[str]) -> bool:
    """Whether the cache holds a snapshot of model repo `repo_id` at `revision` (a branch / tag ref or a commit)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"))
    rev = revision or "main"
    return os.path.isfile(os.path.join(folder, "refs", rev)) or os.path.isdir(os.path.join(folder, "snapshots", rev))


def cached_file(repo_id: str, filename: str, *, flag: str, revision: Optional[str] = None, kind: str = "model",
                strict: bool = False) -> Optional[str]:
    """The local path of one small file of a Hub model repo (from the cache, downloaded when online), or None
    when the repository has no such file. Not cached while offline (and the like) is its one-line `UserError`;
    so is, with `strict`, a cached snapshot without the file while the Hub cannot tell whether the repo has it.

    Lets a run check a Hub id (its config.json, adapter_config.json) before any weights load.
    """
    from huggingface_hub import errors, hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except errors.EntryNotFoundError as exc:
        if isinstance(exc, errors.LocalEntryNotFoundError) and (strict or not _snapshot_cached(repo_id, revision)):
            raise (hub_user_error(exc, repo_id, flag=flag, revision=revision, kind=kind) or exc) from exc
        return None  # the repository (on the Hub, or its cached snapshot) lacks the file
    except (OSError, ValueError) as exc:
        error = hub_user_error(exc, repo_id, flag=flag, revision=revision, kind=kind)
        if error is None:
            raise
        raise error from exc
