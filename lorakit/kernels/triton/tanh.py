"""tanh in float32 for Triton kernels, accurate to about one ulp on the CPU interpreter and the GPU alike.

``libdevice.tanh`` does not run under ``TRITON_INTERPRET=1`` (CI checks every kernel there), and the short forms
``2 * sigmoid(2x) - 1`` or ``(1 - e^-2|x|) / (1 + e^-2|x|)`` lose relative precision near 0 (an absolute error of
~1e-7 that a soft-cap of 50 turns into 5e-6 on an attention score). So: the odd Taylor series up to x^11 for
|x| < 0.3 (the next term is below 1e-9 relative there), the exp form above (no cancellation: 1 - e^-0.6 = 0.45).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh_f32(x):
    """x float32 -> tanh(x) float32, elementwise."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    far = tl.where(x < 0, -far, far)
    x2 = x * x
    # tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925 + O(x^13)
    near = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    return tl.where(a < 0.3, near, far)
