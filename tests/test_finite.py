"""lorakit._finite.all_finite against torch.isfinite(t).all(): every float dtype, NaN / inf / -inf planted at random
places (also the first and last element), empty and 0-d tensors, non-contiguous views, integer and complex tensors."""

from __future__ import annotations

import pytest
import torch

from lorakit._finite import all_finite

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_value_anywhere_is_found(dtype, bad):
    g = torch.Generator().manual_seed(0)
    for position in [0, 4095, *torch.randint(1, 4095, (6,), generator=g).tolist()]:
        x = torch.randn(64, 64, generator=g).to(dtype)
        assert all_finite(x)
        x.view(-1)[position] = bad
        assert not all_finite(x) and not bool(torch.isfinite(x).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_but_finite_values_pass(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor([info.max, info.min, info.tiny, -info.tiny, 0.0, -0.0], dtype=dtype)
    assert all_finite(x)


def test_shapes_views_and_other_kinds():
    assert all_finite(torch.empty(0, 5))
    assert all_finite(torch.tensor(1.5)) and not all_finite(torch.tensor(float("nan")))
    x = torch.randn(8, 6)
    x[3, 4] = float("nan")
    assert not all_finite(x.t())  # a non-contiguous view
    assert all_finite(x[:, :4].t()) and not all_finite(x[:, 4:])
    assert all_finite(torch.arange(10)) and all_finite(torch.tensor([True, False]))
    z = torch.zeros(3, dtype=torch.complex64)
    assert all_finite(z)
    z[1] = complex(0.0, float("inf"))
    assert not all_finite(z)
