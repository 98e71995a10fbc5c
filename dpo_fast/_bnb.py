"""Keep bitsandbytes' probe for an optional package from printing an error-looking line.

On a CPU with AVX512-BF16, importing bitsandbytes (peft imports it) tries the optional `kernels`
package for a faster CPU 4-bit matmul and, when that package is not installed, logs
"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. ..."
as a warning on the logger ``bitsandbytes.backends.cpu.ops``, in every process. Nothing is wrong:
bitsandbytes falls back to its own kernel. This filter drops exactly that record (the message
with a ModuleNotFoundError for ``kernels``); any other failure of the probe, and every other
message of that logger, still shows.
"""
from __future__ import annotations

import logging

PROBE_LOGGER = "bitsandbytes.backends.cpu.ops"
PROBE_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class OptionalKernelsMissing(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward" record when `kernels` is just not installed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(PROBE_MESSAGE):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        missing = args and isinstance(args[0], ModuleNotFoundError) and args[0].name == "kernels"
        return not missing


def quiet_optional_kernel_probe() -> None:
    """Install the filter (idempotent). Must run before bitsandbytes is first imported; it imports nothing."""
    logger = logging.getLogger(PROBE_LOGGER)
    if not any(isinstance(f, OptionalKernelsMissing) for f in logger.filters):
        logger.addFilter(OptionalKernelsMissing())
