"""bitsandbytes' probe for the optional `kernels` package prints nothing in a dpo_fast process; real errors still show."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from dpo_fast._bnb import PROBE_LOGGER, PROBE_MESSAGE, quiet_optional_kernel_probe

# bitsandbytes 0.50's own format string (backends/cpu/ops.py)
_FORMAT = PROBE_MESSAGE + ": %s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_filter_drops_only_the_missing_package_record():
    import dpo_fast  # noqa: F401  (installs the filter)

    quiet_optional_kernel_probe()  # idempotent
    logger = logging.getLogger(PROBE_LOGGER)
    assert sum(type(f).__name__ == "OptionalKernelsMissing" for f in logger.filters) == 1
    sink = _Collect()
    logger.addHandler(sink)
    try:
        missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
        logger.warning(_FORMAT, missing)
        assert sink.messages == []
        hub_down = RuntimeError("could not reach the hub")  # `kernels` installed but failing: a real problem
        logger.warning(_FORMAT, hub_down)
        broken_dep = ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub")
        logger.warning(_FORMAT, broken_dep)
        logger.warning("something else went wrong: %s", missing)
        assert sink.messages == [_FORMAT % hub_down, _FORMAT % broken_dep, f"something else went wrong: {missing}"]
    finally:
        logger.removeHandler(sink)


_PROBE = """
import importlib, sys
import bitsandbytes.functional as F
import bitsandbytes.backends.cpu.ops as ops
F.has_avx512bf16 = lambda: True  # run the probe as on a CPU with AVX512-BF16
importlib.reload(ops)  # bitsandbytes alone: the probe logs its line
print("-- import dpo_fast --", file=sys.stderr, flush=True)
import dpo_fast
importlib.reload(ops)  # the same probe in a dpo_fast process
"""


def test_probe_line_printed_by_bitsandbytes_alone_not_in_a_dpo_fast_process():
    pytest.importorskip("bitsandbytes")
    try:
        import kernels  # noqa: F401
        pytest.skip("the optional `kernels` package is installed: the probe has nothing to report")
    except ImportError:
        pass
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after = out.stderr.split("-- import dpo_fast --")
    assert PROBE_MESSAGE in before  # the probe did run and log (the control)
    assert PROBE_MESSAGE not in after + out.stdout
