"""Which process of a torchrun job prints: read from the environment, before (or without) torch.distributed.

torchrun sets RANK and WORLD_SIZE together. RANK alone (left in a shell by an earlier export, or set by a job
scheduler for another tool) with no WORLD_SIZE above 1 is not a torchrun job: the process is the only one and must
print. Checking RANK alone made such a process silent, its errors included (`lorakit generate` with a stale RANK=1
exited 2 without a word).
"""

from __future__ import annotations

import os


def world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset, empty or not a number: not a torchrun job)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    except ValueError:
        return 1


def speaks() -> bool:
    """True unless this is a torchrun process other than rank 0 (rank 0 alone prints what every process would)."""
    return world_size() <= 1 or os.environ.get("RANK", "0") in ("", "0")
