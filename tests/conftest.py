"""Test set-up: without a GPU, Triton kernels run under the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection.
"""
import os
import shutil
import subprocess


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, but reproducible from the test's node id when debugging."""
    seed = os.environ.get("DPO_FAST_TEST_SEED")
    torch.manual_seed(int(seed) if seed else (hash(request.node.nodeid) & 0xFFFFFFF) ^ os.getpid())
    yield


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
