"""Whole-module copies held as the rows that differ from the base: what a served adapter really costs.

``lorakit.load_adapter`` loads peft's ``trainable_token_indices`` (a few trained rows of the embedding, and of the
output head tied to it) as ``modules_to_save`` copies: a whole ``(vocab, dim)`` weight per module, for a file of a
few KB. A server keeping ``--max-loaded`` such adapters would hold that many copies of its largest matrices (twice
for a tied head). Right after the load, :func:`compact_copies` replaces each copy whose weight differs from the base
in a minority of rows by a :class:`RowOverride` that keeps only those rows and reads every other row from the base
module itself (no copy), with the same outputs. :func:`held_bytes` counts what an adapter then holds in memory.

The load itself still makes each copy for a moment (one at a time, under the pool's lock): peak memory during a
load is one ``(vocab, dim)`` weight per copied module above the base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import ModulesToSave


class RowOverride(nn.Module):
    """``base`` with rows ``indices`` of its weight replaced by ``rows``: an ``nn.Embedding`` (output rows of those
    token ids, then the module's own scaling, as peft's trainable tokens apply it) or a bias-free ``nn.Linear``
    (those output columns). ``indices (k,)`` sorted; ``rows (k, dim)`` in the base weight's dtype.

    The base module is referenced, not registered: its weight stays the base's only (and is not counted here).
    """

    def __init__(self, base: nn.Module, indices: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.__dict__["base"] = base  # not a submodule: neither in parameters(), state_dict() nor .to()
        self.register_buffer("indices", indices)
        self.register_buffer("rows", rows)

    @property
    def weight(self) -> torch.Tensor:
        """The whole weight (base with the rows replaced), built on demand for code that reads ``.weight``."""
        return self.base.weight.detach().index_copy(0, self.indices, self.rows.to(self.base.weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if len(self.indices) == 0:  # an untrained copy (peft starts the trained rows at the base's): the base
            return out
        if isinstance(self.base, nn.Embedding):  # x: token ids (...), out (..., dim)
            spot = torch.searchsorted(self.indices, x).clamp(max=len(self.indices) - 1)
            hit = self.indices[spot] == x
            rows = self.rows[spot]
            scale = getattr(self.base, "embed_scale", None)  # Gemma's scaled embedding, as peft applies it
            if scale is not None:
                rows = rows * (scale.to(rows.dtype) if isinstance(scale, torch.Tensor) else scale)
            return torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)
        # bias-free linear: x (..., in), out (..., out_features); the trained columns come from the kept rows
        return out.index_copy(-1, self.indices, F.linear(x, self.rows.to(x.dtype)).to(out.dtype))


def compact_copies(model: nn.Module, adapter: str) -> list[str]:
    """Replace adapter ``adapter``'s copies of embeddings and bias-free linears that differ from the base in fewer
    than half their rows (none, for trainable tokens saved before training) by a ``RowOverride`` (checked to give the copy's outputs; otherwise the copy stays).
    Returns the paths compacted."""
    from lorakit.inject import adapter_hosts

    done = []
    for path, host in adapter_hosts(model).items():
        if not isinstance(host, ModulesToSave) or adapter not in host.copies:
            continue
        compact = _compact(host.base_layer, host.copies[adapter])
        if compact is not None:
            host.copies[adapter] = compact
            done.append(path)
    return done


def _compact(base: nn.Module, copy: nn.Module) -> RowOverride | None:
    embedding = isinstance(base, nn.Embedding) and base.max_norm is None  # max_norm renormalizes rows on lookup
    linear = type(base) is nn.Linear and base.bias is None
    if not (embedding or linear) or type(copy) is not type(base) or isinstance(copy, RowOverride):
        return None
    ours = dict([*copy.named_parameters(), *copy.named_buffers()])  # non-persistent buffers too (Gemma's scale)
    theirs = dict([*base.named_parameters(), *base.named_buffers()])
    if set(ours) != set(theirs) or any(not torch.equal(ours[n], theirs[n]) for n in ours if n != "weight"):
        return None  # something besides the weight was changed (an embedding's scale, say)
    weight, trained = base.weight.detach(), copy.weight.detach()
    if trained.shape != weight.shape or trained.dtype != weight.dtype:
        return None
    changed = (trained != weight).any(dim=1).nonzero().flatten()
    if 2 * len(changed) >= len(weight):
        return None
    compact = RowOverride(base, changed, trained.index_select(0, changed).clone())
    if embedding and not _same_lookups(copy, compact, changed, len(weight)):
        return None
    return compact


@torch.no_grad()
def _same_lookups(copy: nn.Module, compact: RowOverride, changed: torch.Tensor, vocab: int) -> bool:
    """Whether the compact embedding gives the copy's outputs, exactly, on the changed ids and a few others (an
    embedding subclass whose forward does more than look up and scale is left a copy)."""
    others = torch.tensor([0, vocab - 1, vocab // 2], device=changed.device)
    ids = torch.cat([changed, others]).unsqueeze(0)
    return torch.equal(copy(ids), compact(ids))


def held_bytes(model: nn.Module, adapter: str) -> int:
    """Bytes of the tensors adapter ``adapter`` holds in ``model`` (its LoRA tensors, magnitudes, copies and kept
    rows; a tensor shared by several modules once). The base weights a ``RowOverride`` reads are not counted."""
    from lorakit.inject import adapter_hosts

    seen, total = set(), 0
    for host in adapter_hosts(model).values():
        for holder in (getattr(host, "adapters", None), getattr(host, "copies", None)):
            module = holder[adapter] if holder is not None and adapter in holder else None
            if module is None:
                continue
            for tensor in [*module.parameters(), *module.buffers()]:
                storage = tensor.untyped_storage()
                key = (tensor.device, storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total
