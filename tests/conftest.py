"""Test set-up: without a GPU, Triton kernels run under the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection.

Random inputs are seeded per test from its node id and a run-level base seed (0 unless
DPO_FAST_TEST_SEED says otherwise), so a run is reproducible and a failure names the seed to
rerun it with.
"""
import os
import random
import shutil
import subprocess
import zlib


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def _base_seed() -> int:
    """The run's base seed: DPO_FAST_TEST_SEED (an int, or "random" for a fresh draw), default 0."""
    text = os.environ.get("DPO_FAST_TEST_SEED", "").strip()
    if text.lower() == "random":
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    try:
        return int(text) if text else 0
    except ValueError:
        raise pytest.UsageError(f"DPO_FAST_TEST_SEED: expected an int or 'random', got {text!r}") from None


BASE_SEED = _base_seed()


def seed_for(nodeid: str, base: int = BASE_SEED) -> int:
    """The seed of one test: a stable hash of its node id mixed with the run's base seed.

    The same base gives every test the same inputs in every run (CI never draws new ones by
    itself); another base (DPO_FAST_TEST_SEED=N) gives every test other inputs.
    """
    return zlib.crc32(f"{base}:{nodeid}".encode()) & 0x7FFFFFFF


def pytest_report_header(config):
    return f"dpo_fast test seeds: base {BASE_SEED} (DPO_FAST_TEST_SEED=N or 'random' to change)"


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Seed torch, random and numpy per test, from the node id and the run's base seed."""
    _seed_everything(seed_for(request.node.nodeid))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Module and session fixtures (a saved random model) draw the same whichever tests run before them."""
    if fixturedef.scope != "function":
        _seed_everything(seed_for(f"{request.node.nodeid}::{fixturedef.argname}"))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report names its seed and how to rerun it with the same inputs."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append((
            "test seed",
            f"seed {seed_for(item.nodeid)} (base {BASE_SEED}); rerun with the same inputs: "
            f"DPO_FAST_TEST_SEED={BASE_SEED} python -m pytest '{item.nodeid}'",
        ))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: one thread is fastest and immune to contention on a shared 2-core CI box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tok():
    """The demo task's word-level tokenizer (built from the package's vocabulary, no download)."""
    from dpo_fast.demo_task import demo_tokenizer

    return demo_tokenizer()
