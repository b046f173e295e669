"""Many adapters resident on the device at once, in the layout the multi-LoRA kernels read.

Per target layer, one ``LayerStack``:

    lora_A  (slots, r_max, in)    adapter s's A in rows 0..rank[s]-1, zeros below
    lora_B  (slots, out, r_max)   adapter s's B in columns 0..rank[s]-1, zeros to the right
    scaling (slots,) float32      alpha / r (or alpha / sqrt(r)); 0 for an empty slot
    rank    (slots,) int32        0 for an empty slot

An ``AdapterStack`` shares one name <-> slot table over the LayerStacks of several layers, so a batch's row plan
(``lorakit.kernels.multi_lora.RowPlan``) is built once and read by every layer. Adapters of different ranks share
the buffers: they are padded to r_max with zeros, and the kernels also mask the rank axis by ``rank[s]``, so padded
rows contribute exactly zero. Loading into or evicting from existing capacity writes that slot in place (no
reallocation, the other slots' bytes are untouched, so requests running on other slots are not disturbed); only
growing the capacity (more slots, or a larger r_max) reallocates.

Plain LoRA / rsLoRA only: DoRA's output also rescales the base output per adapter, so DoRA adapters take the
per-adapter reference path (``lorakit.layers``).
"""

from __future__ import annotations

import collections
import weakref
from typing import Iterable, Mapping, Sequence

import torch

from lorakit.errors import LorakitError
from lorakit.kernels.multi_lora import RowPlan, multi_lora_add_, multi_lora_delta, plan_batch, plan_rows_device

__all__ = ["LayerStack", "AdapterStack", "stack_for_layer", "stack_dtype_for", "shared_plan", "stacked_mixed_forward",
           "drop_stack_caches"]

FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LayerStack:
    """The stacked buffers of one target layer (shapes in the module docstring)."""

    def __init__(self, in_features: int, out_features: int, slots: int, r_max: int, dtype: torch.dtype, device):
        if slots < 1 or r_max < 1:
            raise LorakitError(f"a layer stack needs at least one slot and r_max >= 1, got slots={slots}, r_max={r_max}")
        self.in_features, self.out_features = in_features, out_features
        # ordinary tensors even when first built under torch.inference_mode(): a later load outside that mode
        # writes into them in place, which inference tensors refuse
        with torch.inference_mode(False):
            self.lora_A = torch.zeros(slots, r_max, in_features, dtype=dtype, device=device)
            self.lora_B = torch.zeros(slots, out_features, r_max, dtype=dtype, device=device)
            self.scaling = torch.zeros(slots, dtype=torch.float32, device=device)
            self.rank = torch.zeros(slots, dtype=torch.int32, device=device)

    @property
    def slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def r_max(self) -> int:
        return self.lora_A.shape[1]

    def load(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
        """Copy one adapter, lora_A (r, in) and lora_B (out, r), into ``slot`` in place (r <= r_max)."""
        r = lora_A.shape[0]
        if lora_A.shape != (r, self.in_features) or lora_B.shape != (self.out_features, r):
            raise LorakitError(
                f"adapter shapes lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not fit this layer: "
                f"expected (r, {self.in_features}) / ({self.out_features}, r)"
            )
        if r > self.r_max:
            raise LorakitError(f"rank {r} exceeds the stack's r_max={self.r_max}; grow the stack first (AdapterStack grows itself)")
        if not 0 <= slot < self.slots:
            raise LorakitError(f"slot {slot} is out of range: the stack has {self.slots} slots")
        with torch.no_grad():
            self.lora_A[slot, :r].copy_(lora_A)
            self.lora_A[slot, r:].zero_()
            self.lora_B[slot, :, :r].copy_(lora_B)
            self.lora_B[slot, :, r:].zero_()
            self.scaling[slot] = float(scaling)
            self.rank[slot] = r

    def evict(self, slot: int) -> None:
        """Empty ``slot`` in place: rank 0 and zero weights (a row pointed at it gets exactly zero)."""
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.scaling[slot] = 0.0
            self.rank[slot] = 0

    def resized(self, slots: int, r_max: int) -> "LayerStack":
        """A new LayerStack with at least this capacity holding the same adapters (reallocates)."""
        new = LayerStack(self.in_features, self.out_features, max(slots, self.slots), max(r_max, self.r_max),
                         self.lora_A.dtype, self.lora_A.device)
        n, r = self.slots, self.r_max
        with torch.no_grad():
            self._copy_into(new, n, r)
        return new

    def _copy_into(self, new: "LayerStack", n: int, r: int) -> None:
        new.lora_A[:n, :r].copy_(self.lora_A)
        new.lora_B[:n, :, :r].copy_(self.lora_B)
        new.scaling[:n].copy_(self.scaling)
        new.rank[:n].copy_(self.rank)

    def delta(self, x: torch.Tensor, slot_of_row: torch.Tensor) -> torch.Tensor:
        """x (T, in), slot_of_row (T,) -> (T, out): the multi-LoRA delta (dispatcher: Triton or reference)."""
        return multi_lora_delta(x, self.lora_A, self.lora_B, self.scaling, slot_of_row, self.rank)

    def add_(self, y: torch.Tensor, x: torch.Tensor, plan: RowPlan, accumulate: bool = True) -> torch.Tensor:
        """In place y (T, out) += delta of x (T, in) for the rows in ``plan`` (``accumulate=False``: y = delta
        there); inference only."""
        return multi_lora_add_(y, x, self.lora_A, self.lora_B, self.scaling, self.rank, plan, accumulate=accumulate)


class AdapterStack:
    """Named adapters in slots, shared by the LayerStacks of several layers (keyed by layer name).

    ``load(name, weights)`` puts an adapter into a free slot (or its old slot) of every layer; a layer missing
    from ``weights`` gets an empty slot, so the adapter contributes nothing there. ``evict(name)`` frees its slot.
    """

    def __init__(self, layer_shapes: Mapping[str, tuple[int, int]], slots: int = 8, r_max: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", plan_cache: int = 32):
        """layer_shapes: layer key -> (in_features, out_features)."""
        self.dtype, self.device = dtype, torch.device(device)
        self.layers = {key: LayerStack(i, o, slots, r_max, dtype, self.device) for key, (i, o) in layer_shapes.items()}
        self.capacity, self.r_max = slots, r_max
        self.slot_of: dict[str, int] = {}
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._plan_cache = plan_cache

    def __contains__(self, name: str) -> bool:
        return name in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def grow(self, slots: int | None = None, r_max: int | None = None) -> None:
        """More slots and/or a larger r_max. Reallocates every layer's buffers (the only call that does)."""
        slots, r_max = max(slots or 0, self.capacity), max(r_max or 0, self.r_max)
        if (slots, r_max) == (self.capacity, self.r_max):
            return
        self.layers = {key: layer.resized(slots, r_max) for key, layer in self.layers.items()}
        self.capacity, self.r_max = slots, r_max

    def _free_slot(self) -> int:
        used = set(self.slot_of.values())
        for slot in range(self.capacity):
            if slot not in used:
                return slot
        self.grow(slots=2 * self.capacity)
        return self._free_slot()

    def load(self, name: str, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> int:
        """Load adapter ``name``: layer key -> (lora_A (r, in), lora_B (out, r), scaling). Returns its slot.

        Reloading a loaded name overwrites its slot in place. Grows the capacity only when no slot is free or the
        rank exceeds r_max.
        """
        unknown = sorted(set(weights) - set(self.layers))
        if unknown:
            raise LorakitError(f"adapter {name!r} has weights for layers the stack does not hold: {unknown[:3]}; build the stack over those layers")
        rank = max((a.shape[0] for a, _, _ in weights.values()), default=0)
        if rank > self.r_max:
            self.grow(r_max=rank)
        slot = self.slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
        for key, layer in self.layers.items():
            if key in weights:
                lora_A, lora_B, scaling = weights[key]
                layer.load(slot, lora_A.detach().to(self.dtype), lora_B.detach().to(self.dtype), scaling)
            else:
                layer.evict(slot)
        self.slot_of[name] = slot
        return slot

    def evict(self, name: str) -> None:
        """Free ``name``'s slot in place; the other slots are untouched."""
        if name not in self.slot_of:
            raise LorakitError(f"adapter {name!r} is not loaded in this stack; loaded: {sorted(self.slot_of)}")
        slot = self.slot_of.pop(name)
        for layer in self.layers.values():
            layer.evict(slot)

    def slots_for(self, names: Sequence[str | None]) -> list[int]:
        """Slot of each name (None -> -1, no adapter)."""
        try:
            return [-1 if n is None else self.slot_of[n] for n in names]
        except KeyError as missing:
            raise LorakitError(f"adapter {missing.args[0]!r} is not loaded in this stack; load it first (loaded: {sorted(self.slot_of)})") from None

    def plan(self, names: Sequence[str | None], seq_len: int) -> RowPlan:
        """The row plan for a (len(names), seq_len) batch, cached per (slots, seq_len)."""
        return plan_for_slots(tuple(self.slots_for(names)), seq_len, self.device, self._plans, self._plan_cache)

    def add_(self, key: str, y: torch.Tensor, x: torch.Tensor, plan: RowPlan, accumulate: bool = True) -> torch.Tensor:
        """In place y (T, out) += layer ``key``'s delta for x (T, in) (inference only; ``accumulate=False``: y = delta)."""
        return self.layers[key].add_(y, x, plan, accumulate)

    @classmethod
    def from_model(cls, model: torch.nn.Module, adapters: Iterable[str] | None = None, slots: int | None = None,
                   dtype: torch.dtype | None = None, device=None) -> "AdapterStack":
        """A stack over every lorakit linear layer of ``model``, loaded with ``adapters`` (default: all of them).

        Raises LorakitError for a DoRA adapter (it is served by the per-adapter reference path instead).
        """
        from lorakit.layers import LoraLinear  # core -> core; kept lazy so the kernels stay importable alone

        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
        if not layers:
            raise LorakitError("the model has no lorakit LoRA layers; call lorakit.inject(model, config) first")
        names = list(adapters) if adapters is not None else sorted({a for m in layers.values() for a in m.adapters})
        first = next(iter(layers.values()))
        some = next((m.adapters[n] for m in layers.values() for n in names if n in m.adapters), None)
        dtype = dtype or (some.lora_A.dtype if some is not None else torch.float32)
        device = device or first.linear_weight(torch.float32).device
        ranks = [m.adapters[n].rank for m in layers.values() for n in names if n in m.adapters]
        stack = cls({k: (m.in_features, m.out_features) for k, m in layers.items()}, slots=slots or max(1, len(names)),
                    r_max=max(ranks, default=1), dtype=dtype, device=device)
        for name in names:
            weights = {}
            for key, m in layers.items():
                if name in m.adapters:
                    adapter = m.adapters[name]
                    if not adapter.variant.plain:
                        raise LorakitError(f"adapter {name!r} is {adapter.variant_name}; the adapter stack serves lora/rslora only (DoRA runs on the reference path)")
                    if adapter.lora_bias is not None:  # the stacked kernels hold A and B only
                        raise LorakitError(f"adapter {name!r} has a bias on lora_B (lora_bias); the adapter stack serves "
                                           "adapters without one only (it runs on the reference path)")
                    weights[key] = (adapter.lora_A, adapter.lora_B, adapter.scaling)
            stack.load(name, weights)
        return stack


_SHARED_PLANS: collections.OrderedDict = collections.OrderedDict()


def plan_for_slots(slots: tuple[int, ...], seq_len: int, device: torch.device, cache: collections.OrderedDict,
                   size: int = 32) -> RowPlan:
    """Cached ``plan_batch``: every layer whose slot table agrees reuses the same plan (one build per batch).

    Decode (seq_len 1: one row per sequence) gets the device-built plan: sorted on the device, no host sort or
    unique, fixed tile count; a decode step then runs no host work for planning and can be captured in a CUDA
    graph (the cached plan's tensors stay alive while any layer's memo holds the plan).
    """
    key = (slots, seq_len, device)
    plan = cache.get(key)
    if plan is None:
        if seq_len == 1:
            plan = plan_rows_device(torch.tensor(slots, dtype=torch.int32, device=device))
        else:
            plan = plan_batch(slots, seq_len, device)
        cache[key] = plan
        if len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return plan


def stack_dtype_for(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer's stack holds: the activations' 16-bit dtype when adapters are float32 (as a server
    stores them: half the bytes to read per decode step, tensor-core dots; rounding A and B to 16 bits changes the
    output far less than the 16-bit output's own rounding), else the adapters' dtype."""
    if x_dtype in (torch.float16, torch.bfloat16) and adapter_dtype == torch.float32:
        return x_dtype
    return adapter_dtype


# -- a LoRA layer's own stack, for lorakit.mixed_batch ---------------------------------------------------------------
# Checking that a slot still holds its adapter (module, tensors, tensor version counters) costs ~5 us per adapter
# and layer on the 2-core CI machine: 64 adapters x 112 layers of a 1B model would add ~35 ms to every forward,
# more than a decode step. So the deep check runs once per mixed_batch block (the block's list of names is one
# object) and layer; every forward still checks, for ~2 us, that the layer holds the same adapter modules (an
# add, delete or re-add inside the block is seen at once). Adapter weights changed in place inside an open block
# are picked up at the next block.


class _Watch:
    """What an adapter slot was loaded from: a change of module, tensor, version or storage means reload."""

    __slots__ = ("name", "module", "lora_A", "lora_B", "versions", "pointers", "scaling")

    def __init__(self, name: str, module):
        params = module._parameters
        self.name, self.module = name, weakref.ref(module)
        self.lora_A, self.lora_B = weakref.ref(params["lora_A"]), weakref.ref(params["lora_B"])
        self.versions = (params["lora_A"]._version, params["lora_B"]._version)
        self.pointers = (params["lora_A"].data_ptr(), params["lora_B"].data_ptr())
        self.scaling = module.__dict__.get("scaling")

    def holds(self, module) -> bool:
        # weak references: a deleted and re-created adapter is a different object even if it reuses an address
        if module is None or self.module() is not module:
            return False
        params = module._parameters
        a, b = params["lora_A"], params["lora_B"]
        return (self.lora_A() is a and self.lora_B() is b and (a._version, b._version) == self.versions
                and (a.data_ptr(), b.data_ptr()) == self.pointers and module.__dict__.get("scaling") == self.scaling)


class _LayerCache:
    """A one-layer AdapterStack cached on a LoRA layer, what each slot holds, and the last batch's memo."""

    def __init__(self, stack: AdapterStack):
        self.stack = stack
        self.watch: dict[str, _Watch] = {}
        self.batch_key: tuple | None = None  # (names, device, dtype) of the last batch
        self.batch_slots: list[int] = []
        self.batch_watch: list[_Watch] = []
        self.batch_absent: list[str] = []  # names of the batch this layer did not hold
        self.batch_x_dtype: torch.dtype | None = None  # set by stacked_mixed_forward once the batch was eligible
        self.batch_names: list | None = None  # the mixed_batch block's list object the memo was checked for
        self.batch_modules: list = []  # the layer's adapter modules at that check
        self.batch_plan: RowPlan | None = None  # the row plan of the last input shape of this batch

    def batch_is_current(self, key: tuple, modules: dict) -> bool:
        if key != self.batch_key:
            return False
        return all(w.holds(modules.get(w.name)) for w in self.batch_watch) and not any(n in modules for n in self.batch_absent)


def _evict_deleted(cache: _LayerCache, modules: dict) -> None:
    for stale in [n for n in cache.stack.slot_of if n not in modules]:
        cache.stack.evict(stale)
        cache.watch.pop(stale, None)


def shared_plan(slots: Sequence[int], seq_len: int, device: torch.device) -> RowPlan:
    """The row plan for a (len(slots), seq_len) batch from a process-wide cache shared by all layers."""
    return plan_for_slots(tuple(slots), seq_len, device, _SHARED_PLANS)


def stack_for_layer(layer, names: Sequence[str | None], device: torch.device, dtype: torch.dtype) -> tuple[AdapterStack, list[int]]:
    """The layer's cached one-layer stack, synced with its adapters for the names in this batch; and the slots.

    ``layer`` has ``.adapters`` (an nn.ModuleDict of modules with parameters lora_A (r, in), lora_B (out, r) and
    attributes scaling, rank), ``in_features`` and ``out_features``. A name the layer does not hold maps to -1.
    An adapter whose module or tensors were replaced or changed in place (tensor version counters) is reloaded
    into its slot; a deleted one is evicted when its name comes up again or its slot is needed. Slots are given in
    order of first appearance, so layers holding the same adapters agree on slots and share one row plan.
    """
    modules = layer.adapters._modules
    cache: _LayerCache | None = layer.__dict__.get("_lorakit_stack_cache")
    key = (tuple(names), device, dtype)
    if cache is not None and cache.batch_is_current(key, modules):
        return cache.stack, cache.batch_slots
    if cache is None or cache.stack.device != device or cache.stack.dtype != dtype:
        ranks = [m.rank for m in modules.values()]
        stack = AdapterStack({"": (layer.in_features, layer.out_features)}, slots=max(8, len(ranks)),
                             r_max=max(ranks, default=1), dtype=dtype, device=device)
        cache = _LayerCache(stack)
        layer.__dict__["_lorakit_stack_cache"] = cache
    stack = cache.stack
    slots, seen, watched, absent = [], {None: -1}, [], []
    for name in names:
        slot = seen.get(name)
        if slot is None:
            module = modules.get(name)
            if module is None:
                if name in stack:  # deleted from the layer since it was loaded
                    stack.evict(name)
                    cache.watch.pop(name, None)
                absent.append(name)
                slot = -1
            else:
                watch = cache.watch.get(name)
                if watch is None and len(stack) >= stack.capacity:
                    _evict_deleted(cache, modules)  # reuse the slots of deleted adapters before growing
                if watch is None or not watch.holds(module):
                    params = module._parameters
                    stack.load(name, {"": (params["lora_A"], params["lora_B"], module.scaling)})
                    watch = cache.watch[name] = _Watch(name, module)
                watched.append(watch)
                slot = stack.slot_of[name]
            seen[name] = slot
        slots.append(slot)
    cache.batch_key, cache.batch_slots, cache.batch_watch, cache.batch_absent = key, slots, watched, absent
    cache.batch_x_dtype, cache.batch_names, cache.batch_modules = None, names, list(modules.values())
    cache.batch_plan = None
    return stack, slots


def drop_stack_caches(model: torch.nn.Module) -> int:
    """Free the stacks cached on ``model``'s LoRA layers by mixed batches; returns how many layers held one.

    The next mixed batch rebuilds a layer's stack from its own tensors, copying only that batch's adapters. A server
    whose adapters already live in a static decoder's slots calls this after each mixed prefill, so the device
    does not keep a second copy of every adapter a long prompt ever used."""
    dropped = 0
    for module in model.modules():
        if module.__dict__.pop("_lorakit_stack_cache", None) is not None:
            dropped += 1
    return dropped


def _fast_path_adapter_dtype(layer, names: Sequence[str | None]) -> torch.dtype | None | bool:
    """The dtype of the batch's adapters on this layer; None if none is there; False if one needs the reference
    (DoRA or another non-plain variant, or dropout while training). A bias on lora_B (lora_bias) is no reason:
    ``_add_lora_biases`` adds it after the stacked delta."""
    modules = layer.adapters._modules
    dtype = None
    for name in dict.fromkeys(names):
        module = modules.get(name)
        if module is None:
            continue
        if not module.variant.plain or (layer.training and isinstance(module.dropout, torch.nn.Dropout)):
            return False
        dtype = dtype or module.lora_A.dtype  # not _parameters: an nn.DataParallel replica holds it as an attribute
    return dtype


def stacked_mixed_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """A mixed batch through a LoRA linear layer with the SGMV kernels; None when this batch needs the reference.

    ``layer`` is a ``LoraLinear`` with ``row_adapters`` set (adapter name or None per batch row); x (B, ..., in) ->
    (B, ..., out), equal to the per-adapter reference within the dtype's tolerance. Taken only for inference
    (autograd off), float32/float16/bfloat16 inputs on a device where the Triton kernels run, and when every
    adapter of the batch on this layer is plain LoRA / rsLoRA without active dropout (DoRA: reference). An adapter's
    bias on lora_B (peft's lora_bias) is added to its rows after the stacked delta (``_add_lora_biases``).
    """
    names = layer.row_adapters
    if torch.is_grad_enabled() or x.dtype not in FAST_DTYPES or x.dim() < 2 or len(names) != x.shape[0]:
        return None
    from lorakit.kernels._triton import triton_usable

    if not triton_usable(x):
        return None
    cache: _LayerCache | None = layer.__dict__.get("_lorakit_stack_cache")
    if (cache is not None and names is cache.batch_names and not layer.training and cache.batch_x_dtype == x.dtype
            and cache.stack.device == x.device and list(layer.adapters._modules.values()) == cache.batch_modules):
        stack, slots = cache.stack, cache.batch_slots  # same block, same adapter modules: checked and eligible then
    else:
        adapter_dtype = _fast_path_adapter_dtype(layer, names)
        if adapter_dtype is False:
            return None
        if adapter_dtype is None:  # no row of this batch has an adapter on this layer
            return layer.base_layer(x)
        dtype = stack_dtype_for(x.dtype, adapter_dtype)
        if dtype not in FAST_DTYPES:
            return None
        stack, slots = stack_for_layer(layer, names, x.device, dtype)
        layer.__dict__["_lorakit_stack_cache"].batch_x_dtype = x.dtype
    adapter_in = layer._adapter_input(x)
    tokens_per_row = x[0].numel() // x.shape[-1]
    cache = layer.__dict__["_lorakit_stack_cache"]
    if cache.batch_plan is None or cache.batch_plan.num_rows != x.shape[0] * tokens_per_row:
        cache.batch_plan = shared_plan(slots, tokens_per_row, x.device)  # built once per batch shape, for all layers
    plan = cache.batch_plan
    base = layer.base_layer
    x2d = adapter_in.reshape(-1, adapter_in.shape[-1])
    if (plan.block_m > 16 and plan.covers_all and type(base) is torch.nn.Linear and base.bias is None
            and base.weight.dtype == x.dtype and not base.weight.is_meta):
        # (a meta weight is offloaded by accelerate, which loads it only inside base(x): the path below)
        # prefill, every row adapted: the expand writes the delta (no read of y) and the base GEMM adds itself
        # onto it in its epilogue (beta=1), instead of writing y and the expand reading and rewriting it: one pass
        # over the (tokens, out) output less (the first H200 run: the y read-modify-write was most of the 16%)
        out = torch.empty(x2d.shape[0], base.weight.shape[0], dtype=x.dtype, device=x.device)
        stack.add_("", out, x2d, plan, accumulate=False)
        out.addmm_(x2d, base.weight.t())
        return _add_lora_biases(layer, names, out.view(*x.shape[:-1], out.shape[-1]))
    result = base(x)
    out = result.reshape(-1, result.shape[-1])  # a view when contiguous: the delta is added in place
    stack.add_("", out, x2d, plan)
    return _add_lora_biases(layer, names, out.view(result.shape))


def _add_lora_biases(layer, names: Sequence[str | None], y: torch.Tensor) -> torch.Tensor:
    """``y (B, ..., out)`` plus ``s * b`` on the rows of each adapter of ``names`` (one per row) that has a bias on
    lora_B (peft's lora_bias), in place; the stacks hold A and B only. Read from the modules at every call, so a
    bias changed in place is never stale; a batch without such adapters costs one dictionary look-up per name."""
    modules = layer.adapters._modules
    for name in dict.fromkeys(names):
        module = modules.get(name)
        bias = getattr(module, "lora_bias", None)  # not _parameters: an nn.DataParallel replica holds it as an attribute
        if bias is None:
            continue
        rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=y.device)
        y.index_add_(0, rows, (bias * module.scaling).to(y.dtype).expand(len(rows), *y.shape[1:]))
    return y
