"""Reference log-probs computed once per dataset and cached on disk (`--precompute-ref`).

The cache lives in OUTPUT/ref_cache/<key>.pt. The key hashes the model identity (weights path
or random-init config and seed, adapter contents), the reference in use, the tokenized examples
themselves (so data and tokenization settings are both covered) and the settings that change
what a sequence log-prob is (average_log_prob, ld_alpha, precision, ...: the trainer's
`reference_cache_key`). A second run with the same key loads the file instead of running the
reference. The file also holds its key and a sha256 of the tensors: a file that cannot be read,
belongs to another key or fails its checksum is reported in one line and recomputed, never used.
"""
from __future__ import annotations

import hashlib
import json
from array import array
import os
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .loop import autocast, to_device

CACHE_DIR = "ref_cache"
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")

RefFn = Callable[[torch.nn.Module, Dict[str, torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]


def examples_fingerprint(examples: Sequence[Dict[str, Any]]) -> str:
    """sha256 over every field of every example (prompt, chosen and rejected ids ...; the ref log-prob fields
    excluded), in order."""
    h = hashlib.sha256()
    h.update(str(len(examples)).encode())
    for ex in examples:
        for key in sorted(ex):
            if key in REF_KEYS:
                continue
            h.update(key.encode())
            h.update(_field_bytes(ex[key]))
    return h.hexdigest()


def _field_bytes(value: Any) -> bytes:
    """An example field as bytes: a list of ints packed (fast for token ids), anything else as JSON."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, list):
        try:
            packed = array("q", value).tobytes()
            return b"i%d:" % len(value) + packed
        except (TypeError, OverflowError):
            pass
    text = json.dumps(value, default=str, separators=(",", ":")).encode()
    return b"j%d:" % len(text) + text


def cache_key(*, model_id: str, reference: str, examples: Sequence[Dict[str, Any]],
              settings: Dict[str, Any], fingerprint: Optional[str] = None) -> str:
    """The cache file name stem for this model / reference / data / tokenization / loss settings
    (`fingerprint`: `examples_fingerprint(examples)`, when the caller has computed it already)."""
    if fingerprint is None:
        fingerprint = examples_fingerprint(examples)
    payload = json.dumps({"model": model_id, "reference": reference, "examples": fingerprint,
                          "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def compute_reference_logps(model: torch.nn.Module, examples: Sequence[Dict[str, Any]], collate: Callable,
                            ref_fn: RefFn, *, batch_size: int, device: torch.device,
                            autocast_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference sequence log-probs (fp32, [N] each) of the examples, in their order."""
    chosen: List[torch.Tensor] = []
    rejected: List[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        part = [{k: v for k, v in ex.items() if k not in REF_KEYS} for ex in examples[start:start + batch_size]]
        batch = to_device(collate(part), device)
        with torch.no_grad(), autocast(device, autocast_dtype):
            c, r = ref_fn(model, batch)
        chosen.append(c.detach().float().cpu())
        rejected.append(r.detach().float().cpu())
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def load_or_compute(cache_root: str, key: str, compute: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
                    *, expected_len: int, warn: Optional[Callable[[str], None]] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """(chosen, rejected, from_cache): load cache_root/ref_cache/<key>.pt or compute and write it."""
    cached = load_cached(cache_root, key, expected_len=expected_len, warn=warn)
    if cached is not None:
        return cached[0], cached[1], True
    chosen, rejected = compute()
    write_cache(cache_root, key, chosen, rejected)
    return chosen, rejected, False


def load_cached(cache_root: str, key: str, *, expected_len: int, warn: Optional[Callable[[str], None]] = None
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(chosen, rejected) from cache_root/ref_cache/<key>.pt, or None when absent, damaged or stale.

    A file that exists but cannot be used (unreadable, another key, a checksum or length mismatch) is
    reported through `warn` (default: warnings.warn) in one line; the caller recomputes and rewrites it.
    """
    path = cache_path(cache_root, key)
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        problem = _problem(data, key, expected_len)
    except Exception as exc:  # a truncated or otherwise damaged file: whatever torch.load raises
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        problem = f"unreadable ({type(exc).__name__}{': ' + detail[:160] if detail else ''})"
    if problem is None:
        return data["chosen"], data["rejected"]
    message = f"warning: reference log-prob cache {path}: {problem}; not used, recomputing it"
    if warn is None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    else:
        warn(message)
    return None


def _problem(data: Any, key: str, expected_len: int) -> Optional[str]:
    """Why a loaded cache entry cannot be used for `key` (None: it can)."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), torch.Tensor) for k in ("chosen", "rejected")):
        return "not a reference cache file"
    if data.get("key") != key:
        return "written for other settings (stale key)" if "key" in data else "no key recorded (stale format)"
    chosen, rejected = data["chosen"], data["rejected"]
    if chosen.numel() != expected_len or rejected.numel() != expected_len:
        return f"holds {chosen.numel()} / {rejected.numel()} log-probs for {expected_len} pairs"
    if data.get("checksum") != tensor_checksum(chosen, rejected):
        return "checksum mismatch (the values were changed or damaged)"
    return None


def tensor_checksum(*tensors: torch.Tensor) -> str:
    """sha256 over the tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_cache(cache_root: str, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write cache_root/ref_cache/<key>.pt (key, tensors, checksum) atomically; non-finite log-probs are an
    error, not a cache entry."""
    if not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
        raise FloatingPointError("reference log-probs are not finite; not caching them")
    path = cache_path(cache_root, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    chosen, rejected = chosen.detach().float().cpu().contiguous(), rejected.detach().float().cpu().contiguous()
    torch.save({"key": key, "chosen": chosen, "rejected": rejected,
                "checksum": tensor_checksum(chosen, rejected)}, tmp)
    os.replace(tmp, path)


def cache_path(cache_root: str, key: str) -> str:
    return os.path.join(cache_root, CACHE_DIR, f"{key}.pt")


def attach_reference_logps(examples: Iterable[Dict[str, Any]], chosen: torch.Tensor,
                           rejected: torch.Tensor) -> List[Dict[str, Any]]:
    """Copies of the examples carrying ref_chosen_logps / ref_rejected_logps (python floats)."""
    out = []
    for ex, c, r in zip(examples, chosen.tolist(), rejected.tolist()):
        ex = dict(ex)
        ex["ref_chosen_logps"] = float(c)
        ex["ref_rejected_logps"] = float(r)
        out.append(ex)
    return out
