"""The device side of programmatic dependent launch (see ``lorakit.kernels._triton.programmatic_launches``).

A kernel that supports PDL takes a ``PDL: tl.constexpr`` (true exactly when it was launched with ``launch_pdl``),
may load what no earlier kernel of the step writes (weights) first, and calls ``pdl_enter(PDL)`` before it reads
any other input or writes anything. ``pdl_enter`` waits for the previous kernel to finish (its writes visible), then
lets the next kernel launch: so when a kernel's pre-wait loads run, every kernel before its predecessor has finished.
With PDL off it compiles to nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: ``pdl_supported`` is False, so PDL is never asked for
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def l2_prefetch(ptrs):
    """Ask the L2 to fetch the 128-byte lines at ``ptrs`` (a block of pointers, one per line): a hint with no result,
    no shared memory and no registers held, so a kernel can start its weight's DRAM reads before ``pdl_enter`` while
    the previous kernel drains. GPU only (inline PTX; the interpreter cannot run it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
