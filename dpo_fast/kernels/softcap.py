"""Final-logit softcapping inside the head's tile kernels: ``zc = c * tanh(z / c)`` and its slope.

Gemma 2 caps its logits this way (``final_logit_softcapping``). The kernels need, per logit,
the capped value and the derivative ``dzc/dz = 1 - tanh(z/c)^2``. Both come from one
``e = exp(-2|z/c|)``:

* ``tanh(|x|) = (1 - e) / (1 + e)`` for ``|x| >= 1/4`` (there ``e <= 0.61`` and ``1 - e`` is exact,
  so a few ulp), and the odd Taylor series to ``x^9`` below (truncation < 1e-8 relative), where
  ``1 - e`` would cancel;
* ``1 - tanh(x)^2 = 4e / (1 + e)^2``, accurate to a few ulp even where tanh saturates (``1 - t*t``
  from a rounded ``t`` near 1 loses most of its digits for ``|z| >> c``).

Triton's interpreter has no ``libdevice.tanh``, hence this formula; ±inf give ±c and slope 0, NaN stays NaN.
The pure-torch mirror is `dpo_fast.ops.tiles.softcap_values` / `softcap_slope`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softcap_and_slope(z, cap):
    """(cap * tanh(z / cap), 1 - tanh(z / cap)^2) of an fp32 block."""
    x = z / cap
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    r = 1.0 / (1.0 + e)
    xs = tl.minimum(ax, 0.25)  # the series is only taken below 1/4; clamped, it cannot overflow
    x2 = xs * xs
    series = xs * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                          + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(ax < 0.25, series, (1.0 - e) * r)
    t = tl.where(x < 0.0, -t, t)
    return cap * t, 4.0 * e * r * r
