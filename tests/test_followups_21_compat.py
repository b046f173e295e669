"""lorakit on the lowest transformers pyproject allows (4.56), tested here on the suite's 5.x with 4.x's shapes.

Found by running a core subset of the suite in a side environment with transformers 4.56.2 (peft 0.21.2, trl 1.16):
``lorakit.generation``'s batched KV cache found no layer to move on 4.56, whose cache layers have no
``is_initialized`` attribute (5.x added it), so rows leaving or joining a running batch left the keys and values
behind and the next decode step failed inside transformers (a torch.cat size mismatch, a traceback): ``lorakit
generate`` with several prompts, ``lorakit serve``'s continuous batching and ``compare`` all hit it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lorakit import generation as G


class _Layer456:
    """transformers 4.56's ``DynamicLayer`` as lorakit sees it: ``keys`` / ``values`` ``(B, heads, L, d)``, None
    until the first update, and no ``is_initialized`` attribute."""

    is_sliding = False

    def __init__(self, keys=None, values=None):
        self.keys, self.values = keys, values


def _batch_456(rows: int = 3, length: int = 4):
    """A ``KVBatch`` over one filled 4.56-shaped layer and one still-empty one; row r is left-padded by r columns."""
    keys = torch.arange(rows * 2 * length * 2, dtype=torch.float32).view(rows, 2, length, 2)
    filled = _Layer456(keys, -keys)
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, :r] = 0
    cache = SimpleNamespace(layers=[filled, _Layer456()])
    return G.KVBatch(cache, mask, mask.sum(dim=1)), filled, keys


def test_kv_layers_of_a_4x_cache_are_found_and_empty_ones_left_out():
    batch, filled, _ = _batch_456()
    assert batch._kv_layers() == [filled]


def test_rows_leaving_a_4x_cache_take_their_keys_and_drop_shared_padding():
    """Keeping rows 2 and 1 (in that order) selects their keys and values and drops the column that is padding in
    both (row 1 has one padding column, row 2 two): (3, 2, 4, 2) -> (2, 2, 3, 2). Before the fix the layer kept all
    three rows and four columns while the mask had two rows and three, and the next step failed."""
    batch, filled, keys = _batch_456()
    batch.keep([2, 1])
    assert batch.mask.shape == (2, 3)
    assert filled.keys.shape == (2, 2, 3, 2)
    torch.testing.assert_close(filled.keys, keys[[2, 1], :, 1:])
    torch.testing.assert_close(filled.values, -keys[[2, 1], :, 1:])


def test_rows_joining_a_4x_cache_are_left_padded_and_appended():
    """A one-row batch of two columns joins a three-row batch of four: it is left-padded with two zero columns."""
    batch, filled, keys = _batch_456()
    new = torch.full((1, 2, 2, 2), 7.0)
    other = G.KVBatch(SimpleNamespace(layers=[_Layer456(new, -new), _Layer456()]),
                      torch.ones(1, 2, dtype=torch.long), torch.tensor([2]))
    batch.extend(other)
    assert batch.mask.shape == (4, 4) and batch.mask[3].tolist() == [0, 0, 1, 1]
    assert filled.keys.shape == (4, 2, 4, 2)
    torch.testing.assert_close(filled.keys[:3], keys)
    torch.testing.assert_close(filled.keys[3, :, 2:], new[0])
    assert not filled.keys[3, :, :2].any()
