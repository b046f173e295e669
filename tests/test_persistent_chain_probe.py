"""bench/persistent_chain_probe.py's kernel on the CPU (TRITON_INTERPRET=1): its stream-K split of every GEMM over
an uneven number of programs, the in-kernel zeroing two stages ahead, and the persistent path (one program, where
the interpreter can run a grid barrier) all give each GEMM of the chain x W^T, on buffers left dirty by a previous
run. The timed runs are GPU-only; this keeps the probe's arithmetic honest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "persistent_chain_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("persistent_chain_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chain(probe, out_dtype=torch.float32):
    # every projection a different shape; 5 rows (not a power of two); 3 layers so stages wrap across layers
    return probe.Chain(hidden=32, inter=48, qkv=64, layers=3, rows=5, device="cpu", dtype=torch.float16,
                       out_dtype=out_dtype)


@pytest.mark.parametrize("programs", [1, 3, 7])
def test_per_stage_launches_compute_every_gemm(probe, programs):
    c = _chain(probe)
    for y in (c.yq, c.yo, c.yg, c.yd):
        y.fill_(123.0)  # stale values: every stage's output must be zeroed before its atomics
    probe.run_chain(c, programs, (16, 16, 1, 1), barrier=False, prefetch=0)
    assert probe.check_chain(c, [0, 1, 2]) < 1e-5
    assert c.yd[2].abs().max() > 0.1  # the chain really ran to its end


def test_persistent_launch_matches_per_stage_and_runs_twice(probe):
    reference = _chain(probe)
    probe.run_chain(reference, 3, (16, 16, 1, 1), barrier=False, prefetch=0)
    c = _chain(probe)
    for _ in range(2):  # the second run starts from the first run's outputs and counter
        probe.run_chain(c, 1, (16, 16, 1, 1), barrier=True, prefetch=0)
        assert c.error.item() == 0
        assert c.counter.item() == 4 * c.L  # one barrier after the zeroing, one between each pair of stages
        assert probe.check_chain(c, [0, 1, 2]) < 1e-5
        torch.testing.assert_close(c.yd, reference.yd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("programs", [1, 2, 5])
def test_whole_column_blocks_per_stage_and_persistent(probe, programs):
    # the tiles mode: half-precision outputs, column blocks pid, pid + P, ... (5 programs: some get none of o's 2)
    reference = _chain(probe)
    probe.run_chain(reference, 3, (16, 16, 1, 1), barrier=False, prefetch=0)
    per_stage = _chain(probe, torch.float16)
    probe.run_chain(per_stage, programs, (16, 16, 1, 1), barrier=False, prefetch=0)
    assert probe.check_chain(per_stage, [0, 1, 2]) < 2e-3  # the outputs' own half-precision rounding
    persistent = _chain(probe, torch.float16)
    probe.run_chain(persistent, 1, (16, 16, 1, 1), barrier=True, prefetch=0)
    assert persistent.error.item() == 0
    torch.testing.assert_close(persistent.yd, per_stage.yd, rtol=0, atol=0)
    torch.testing.assert_close(persistent.yd.float(), reference.yd, rtol=2e-2, atol=2e-2)


def test_a_weight_that_does_not_tile_is_refused(probe):
    c = _chain(probe)
    with pytest.raises(ValueError, match="does not tile"):
        probe.run_chain(c, 2, (64, 16, 1, 1), barrier=False, prefetch=0)
