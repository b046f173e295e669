"""The adapters a static decoder serves, stacked per projection group in the layout the grouped kernels read.

Per decoder layer and group (``qkv``: q, k, v; ``o``; ``gate_up``: gate, up; ``down``; Phi-3's fused ``qkv_proj``
and ``gate_up_proj`` are one-member groups, ``ModelParts.groups``), one ``GroupStack``:

    A        (slots, G*R, in)   segment g of slot s: rows g*R .. g*R + rank[s, g] - 1 hold projection g's lora_A
    B        (slots, N, R)      columns of projection g (its rows of the fused output) hold its lora_B
    scaling  (slots, G) float32 alpha / r (or alpha / sqrt(r)); 0 where the slot has no adapter
    rank     (slots, G) int32   0 where the slot has no adapter on that projection
    ratio    (slots + 1, N) float32, DoRA only: m / ||W + s B A|| per output feature (ones for plain adapters and
             for the last row, which rows without an adapter (slot -1) index)
    lora_bias (slots + 1, N) float32, peft's ``lora_bias`` only: s * b, the scaled bias of each projection's lora_B
             (zeros for adapters without one and for the last row)

Slots are shared by all layers (one name -> slot table), so a decode step's ``slot_of_row`` is one device tensor.
Loading writes one slot in place; only growing (more slots, larger R) reallocates, which bumps ``version`` so
that a captured CUDA graph (which holds buffer addresses) is captured again.

One copy on the device: once an adapter is in a slot, the model's own ``lora_A`` / ``lora_B`` of each projection
(same dtype and device as the stacks) become views of its rows of ``A`` and ``B``, so serving many adapters does
not hold each twice (the modules' forward, merge and save read the same values). Growing re-points the views;
reloading or evicting a name whose modules are still in the model first gives them their own copy back.

DoRA (Liu et al. 2024, PEFT's formula) is served exactly: with r = m / ||W + s B A|| per output feature, the
projection is ``r * (x W^T + s x A^T B^T) + bias``; the decoder multiplies the group's output by ``ratio`` gathered
per row before adding the bias. The norm is computed once at load from the current base weight. peft's ``lora_bias``
(a bias b on lora_B: the update is ``s (B A x + b)``) is served by adding ``s b`` gathered per row.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Sequence

import torch

from lorakit.decoding.architecture import GROUPS, ModelParts  # noqa: F401  (GROUPS: the Llama layout, re-exported)
from lorakit.errors import LorakitError

NORM_EPS = 1e-12  # as lorakit.variants.dora


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class GroupStack:
    """Stacked adapters of one projection group of one layer (shapes in the module docstring)."""

    def __init__(self, in_features: int, splits: Sequence[int], slots: int, r_max: int, dtype, device):
        self.in_features, self.splits = in_features, tuple(splits)
        G, N = len(self.splits), sum(self.splits)
        self.A = torch.zeros(slots, G * r_max, in_features, dtype=dtype, device=device)
        self.B = torch.zeros(slots, N, r_max, dtype=dtype, device=device)
        self.scaling = torch.zeros(slots, G, dtype=torch.float32, device=device)
        self.rank = torch.zeros(slots, G, dtype=torch.int32, device=device)
        self.ratio: torch.Tensor | None = None  # allocated when the first DoRA adapter arrives
        self.lora_bias: torch.Tensor | None = None  # allocated when the first adapter with a lora_B bias arrives

    @property
    def r_max(self) -> int:
        return self.B.shape[2]

    def column_ranges(self):
        start = 0
        for size in self.splits:
            yield start, start + size
            start += size

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.scaling[slot] = 0.0
        self.rank[slot] = 0
        if self.ratio is not None:
            self.ratio[slot] = 1.0
        if self.lora_bias is not None:
            self.lora_bias[slot] = 0.0

    def write(self, slot: int, segment: int, adapter, base_weight: torch.Tensor) -> None:
        """Put one projection's adapter (a lorakit LoraAdapter) into ``slot``, segment ``segment``."""
        r, R = adapter.rank, self.r_max
        lo, hi = list(self.column_ranges())[segment]
        self.A[slot, segment * R:segment * R + r].copy_(adapter.lora_A.detach())
        self.B[slot, lo:hi, :r].copy_(adapter.lora_B.detach())
        self.scaling[slot, segment] = float(adapter.scaling)
        self.rank[slot, segment] = r
        if adapter.magnitude is not None:
            if self.ratio is None:
                self.ratio = torch.ones(self.A.shape[0] + 1, self.B.shape[1], dtype=torch.float32, device=self.A.device)
            weight = base_weight.float() + adapter.delta_weight().to(base_weight.device)
            norm = torch.linalg.vector_norm(weight, dim=1).clamp_min(NORM_EPS)
            self.ratio[slot, lo:hi] = adapter.magnitude.detach().float() / norm
        if getattr(adapter, "lora_bias", None) is not None:
            if self.lora_bias is None:
                self.lora_bias = torch.zeros(self.A.shape[0] + 1, self.B.shape[1], dtype=torch.float32,
                                             device=self.A.device)
            self.lora_bias[slot, lo:hi] = float(adapter.scaling) * adapter.lora_bias.detach().float()

    def resized(self, slots: int, r_max: int) -> "GroupStack":
        new = GroupStack(self.in_features, self.splits, slots, r_max, self.A.dtype, self.A.device)
        n, R = self.A.shape[0], self.r_max
        for g in range(len(self.splits)):
            new.A[:n, g * r_max:g * r_max + R].copy_(self.A[:, g * R:(g + 1) * R])
        new.B[:n, :, :R].copy_(self.B)
        new.scaling[:n].copy_(self.scaling)
        new.rank[:n].copy_(self.rank)
        if self.ratio is not None:
            new.ratio = torch.ones(slots + 1, self.B.shape[1], dtype=torch.float32, device=self.A.device)
            new.ratio[:n].copy_(self.ratio[:n])
        if self.lora_bias is not None:
            new.lora_bias = torch.zeros(slots + 1, self.B.shape[1], dtype=torch.float32, device=self.A.device)
            new.lora_bias[:n].copy_(self.lora_bias[:n])
        return new


class DecodeAdapters:
    """Named adapters of a model in slots, stacked for every layer's four projection groups.

    ``weights[i][group]`` is layer i's fused base weight (a ``FusedWeight``), read for DoRA norms.
    """

    def __init__(self, parts: ModelParts, weights: list[dict], slots: int, r_max: int, dtype, device):
        self.parts, self.weights = parts, weights
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = [
            {group: GroupStack(weights[i][group].in_features, weights[i][group].splits, slots, r_max, dtype, device)
             for group, _ in parts.groups}
            for i in range(len(parts.layers))
        ]
        self.capacity, self.r_max = slots, r_max
        self.slot_of: dict[str, int] = {}
        self.source: dict[str, weakref.ref] = {}  # name -> the adapter module (of its first projection) loaded
        self.dora: set[str] = set()
        self.biased: set[str] = set()  # names with a lora_B bias (peft's lora_bias)
        # name -> a serial given at each load (never reused): K/V computed under one load of an adapter are not
        # another's (the prefix cache keys its blocks with it)
        self.serial_of: dict[str, int] = {}
        self._serials = itertools.count(1)
        self.version = 0

    def __contains__(self, name: str) -> bool:
        return name in self.slot_of

    @property
    def has_dora(self) -> bool:
        return bool(self.dora)

    @property
    def has_lora_bias(self) -> bool:
        return bool(self.biased)

    def _modules(self, name: str):
        """(layer, group, segment, adapter module) of every projection holding ``name``."""
        found = []
        for i, layer in enumerate(self.parts.layers):
            for group, members in self.parts.groups:
                for segment, proj in enumerate(members):
                    adapters = getattr(layer.projections[proj], "adapters", None)
                    if adapters is not None and name in adapters:
                        found.append((i, group, segment, adapters[name]))
        return found

    def _viewing(self, found):
        """Those of ``found`` ((layer, group, segment, adapter module)) whose tensors are views of the stacks now."""
        return [(i, group, segment, adapter) for i, group, segment, adapter in found
                if _same_storage(adapter.lora_A, self.layers[i][group].A)]

    def _shared(self, name: str):
        """The projections of ``name`` whose tensors are views of the stacks now."""
        return self._viewing(self._modules(name))

    def _share(self, slot: int, found) -> None:
        """Make the modules' lora_A / lora_B views of their rows in ``slot`` (values equal: just written there)."""
        R = self.r_max
        for i, group, segment, adapter in found:
            stack = self.layers[i][group]
            if adapter.lora_A.dtype != stack.A.dtype or adapter.lora_A.device != stack.A.device:
                continue  # e.g. float32 adapters on a bf16 model: the stack holds a rounded copy, the module its own
            lo, hi = list(stack.column_ranges())[segment]
            adapter.lora_A.data = stack.A[slot, segment * R:segment * R + adapter.rank]
            adapter.lora_B.data = stack.B[slot, lo:hi, :adapter.rank]

    @staticmethod
    def _unshare(found) -> None:
        """Give the modules their own copy back (before their slot is cleared or rewritten)."""
        for *_, adapter in found:
            adapter.lora_A.data = adapter.lora_A.data.clone()
            adapter.lora_B.data = adapter.lora_B.data.clone()

    def grow(self, slots: int, r_max: int) -> None:
        slots, r_max = max(slots, self.capacity), max(r_max, self.r_max)
        if (slots, r_max) == (self.capacity, self.r_max):
            return
        shared = {name: self._shared(name) for name in self.slot_of}
        with torch.no_grad():
            self.layers = [{g: stack.resized(slots, r_max) for g, stack in layer.items()} for layer in self.layers]
        self.capacity, self.r_max = slots, r_max
        for name, found in shared.items():  # the old buffers are freed once nothing views them
            self._share(self.slot_of[name], found)
        self.version += 1

    def load(self, name: str, present: Sequence[str] = ()) -> int:
        """Copy adapter ``name`` from the model's LoRA layers into a slot (its old one when reloading).

        ``present``: names still in the model; when no slot is free, slots of names not in it are freed first.
        """
        found = self._modules(name)
        if not found:
            raise LorakitError(f"adapter {name!r} is not on any attention or MLP projection of this model")
        rank = max(adapter.rank for *_, adapter in found)
        slot = self.slot_of.get(name)
        if slot is None:
            for stale in [n for n in self.slot_of if present and n not in present]:
                self.evict(stale)
            used = set(self.slot_of.values())
            slot = next((s for s in range(self.capacity) if s not in used), None)
            if slot is None:
                self.grow(2 * self.capacity, rank)
                slot = len(used)
        self.grow(self.capacity, rank)
        dora = biased = False
        self._unshare(self._viewing(found))  # a reload: the slot is cleared below, the module's values must survive it
        with torch.no_grad():
            for layer in self.layers:
                for stack in layer.values():
                    stack.clear(slot)
            for i, group, segment, adapter in found:
                fused = self.weights[i][group]
                # a view, or the NF4 weight dequantized to the adapter's dtype (as LoraLinear's DoRA forward reads it)
                base = fused.member_weight(segment, adapter.lora_A.dtype)
                stack = self.layers[i][group]
                had_ratio, had_bias = stack.ratio is not None, stack.lora_bias is not None
                stack.write(slot, segment, adapter, base)
                if adapter.magnitude is not None:
                    dora = True
                    if not had_ratio:
                        self.version += 1  # a new buffer the captured graph does not know
                if getattr(adapter, "lora_bias", None) is not None:
                    biased = True
                    if not had_bias:
                        self.version += 1
        self.slot_of[name] = slot
        self.serial_of[name] = next(self._serials)
        self.source[name] = weakref.ref(found[0][3])
        (self.dora.add if dora else self.dora.discard)(name)
        (self.biased.add if biased else self.biased.discard)(name)
        self._share(slot, found)
        return slot

    def hold(self, name: str) -> int:
        """Put a placeholder adapter ``name`` in a free slot (growing if none is): rank ``r_max`` on every projection
        with zero weights and scaling, so rows on it run the grouped LoRA kernels at full size and compute the base
        model's output. For ``StaticDecoder.warm_up``; ``evict`` removes it (and any structure change does: it has
        no modules in the model)."""
        used = set(self.slot_of.values())
        slot = next((s for s in range(self.capacity) if s not in used), None)
        if slot is None:
            self.grow(2 * self.capacity, self.r_max)
            slot = len(used)
        for layer in self.layers:
            for stack in layer.values():
                stack.clear(slot)
                stack.rank[slot] = self.r_max
        self.slot_of[name] = slot
        return slot

    def evict(self, name: str) -> None:
        self._unshare(self._shared(name))  # still in the model: its modules keep their values
        slot = self.slot_of.pop(name)
        self.serial_of.pop(name, None)
        self.source.pop(name, None)
        self.dora.discard(name)
        self.biased.discard(name)
        with torch.no_grad():
            for layer in self.layers:
                for stack in layer.values():
                    stack.clear(slot)

    def drop_replaced(self) -> None:
        """Evict the names whose adapter modules are gone from the model or were replaced by others under the same
        name (``delete_adapter`` then a new ``inject`` / ``load_adapter``): their slots would serve the old values.
        Called when lorakit changed the model's modules; such a name is loaded again on its next use."""
        for name in list(self.slot_of):
            found = self._modules(name)
            if not found or self.source[name]() is not found[0][3]:
                self.evict(name)

    def slots_for(self, names: Sequence[str | None], present: Sequence[str] = ()) -> list[int]:
        """The slot of each name (None -> -1), loading names not loaded yet."""
        slots = []
        for name in names:
            if name is None:
                slots.append(-1)
            else:
                slot = self.slot_of.get(name)
                slots.append(self.load(name, present) if slot is None else slot)
        return slots
