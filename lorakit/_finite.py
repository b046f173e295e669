"""Whether a tensor holds only finite values, in one reduction that writes nothing.

``torch.isfinite(t).all()`` first writes a bool tensor as large as ``t``; on the CPU it took 760 ms on a 4096 x
8192 weight where ``torch.aminmax`` took 24 ms (2 cores). The checks before a merge, an export or an NF4
quantization run it on every weight of a model. A NaN anywhere makes both the min and the max NaN, and an inf is
itself the max (or -inf the min), so the two ends being finite means every element is.
"""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when every element of ``tensor`` (any shape, layout or device) is finite; integer tensors always are."""
    if tensor.is_complex():
        return bool(torch.isfinite(tensor).all())
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(torch.stack((low, high))).all())  # one device-to-host read
