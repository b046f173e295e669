"""LoRA layers: a frozen base module plus named adapters, each with one variant (a strategy object).

``LoraLinear`` wraps ``nn.Linear``, transformers' ``Conv1D`` and any ``lorakit.quant.QuantizedLinear``;
``LoraEmbedding`` wraps ``nn.Embedding``. Storage of the base weight is hidden behind ``lorakit.quant``'s
``dense_weight`` / ``set_dense_weight``, so forward and merge are written once for every kind of base.

Nothing happens by side effect: ``.eval()`` only switches dropout off; merging is an explicit call.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import quant
from lorakit.errors import LorakitError
from lorakit.kernels.lora_linear import lora_linear
from lorakit.variants import get_variant



def init_from_cpu(param: torch.Tensor, fill) -> None:
    """``fill(tensor)`` (a random ``nn.init`` function) drawn from the CPU generator whatever ``param``'s device, then
    copied in: the same seed gives the same adapter on a CPU, a GPU, or a CPU-built model sharded onto GPUs later
    (``lorakit train --fsdp`` injects on the CPU; one process injects on its GPU, whose generator draws other
    numbers). On the CPU (and meta) it fills ``param`` itself: the draws are those of ``fill(param)``. A float64
    ``param`` (the adapter of a float64 model) gets the float32 draws, exactly: the same seed gives the same adapter
    on a float64 reference as on the float32 or 16-bit model it checks (float64 draws are other numbers)."""
    if param.device.type == "meta" or (param.device.type == "cpu" and param.dtype != torch.float64):
        fill(param)
        return
    values = torch.empty(param.shape, dtype=torch.float32 if param.dtype == torch.float64 else param.dtype)
    fill(values)
    param.copy_(values)

class LoraAdapter(nn.Module):
    """One adapter on one layer, in linear form: ``lora_A (r, in)``, ``lora_B (out, r)``, DoRA's ``magnitude (out,)``,
    and with ``lora_bias`` the bias of B ``(out,)`` (PEFT's ``lora_B.bias``: the update is ``s * (B A x + b)``).

    For an embedding, ``in`` is the number of embeddings and ``out`` the embedding size (PEFT's
    ``lora_embedding_A`` / ``lora_embedding_B`` have exactly these shapes).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, variant: str, dropout: float,
                 dtype: torch.dtype, device: torch.device | None, lora_bias: bool = False):
        super().__init__()
        self.rank, self.alpha, self.variant_name = rank, float(alpha), variant
        self.variant = get_variant(variant)
        self.scaling = self.variant.scaling(rank, alpha)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.magnitude: nn.Parameter | None = None
        # zero at the start, as peft's, so the adapted layer starts equal to the base
        self.lora_bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if lora_bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merge_norm: torch.Tensor | None = None  # DoRA: the norm at merge time, so unmerge can invert it
        self.pissa_init: tuple[torch.Tensor, torch.Tensor] | None = None  # PiSSA: (A0, B0), to save in LoRA form

    def extra_repr(self) -> str:
        bias = ", lora_bias=True" if self.lora_bias is not None else ""
        return f"variant={self.variant_name}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}{bias}"

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` in float32, ``(out, in)`` (plain LoRA's update; DoRA's merged update differs)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling


class _AdapterHost(nn.Module):
    """What every lorakit wrapper shares: named adapters, which are active, merged, disabled or mixed per row."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by lorakit.mixed_batch: adapter of each batch row

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def set_active(self, names: Iterable[str]) -> None:
        self.active = [n for n in names if n in self.adapter_names()]

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from ``self.adapters`` (``LoraLayer``, ``ParamLora``; ``ModulesToSave`` keeps
        copies instead and has its own). A merged one is refused: its update is still in the base weights."""
        if name in self.merged:
            raise LorakitError(f"adapter {name!r} is merged; unmerge it before deleting it")
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def _rows_by_adapter(self, batch: int) -> dict[str | None, torch.Tensor]:
        rows = self.row_adapters
        if len(rows) != batch:
            if not rows or batch % len(rows):
                raise LorakitError(f"mixed_batch was given {len(rows)} adapter names but the batch has {batch} rows")
            # the model flattened (B, T, H) to (B * T, H) before this layer (OPT's MLP): each row's T tokens stay
            # together, so row i's name covers T consecutive rows
            tokens = batch // len(rows)
            rows = [name for name in rows for _ in range(tokens)]
        groups: dict[str | None, list[int]] = {}
        for index, name in enumerate(rows):
            groups.setdefault(name if name in self.adapter_names() else None, []).append(index)
        return {name: torch.tensor(idx, dtype=torch.long) for name, idx in groups.items()}


class LoraLayer(_AdapterHost):
    """Shared logic of ``LoraLinear`` and ``LoraEmbedding``: adapters, forward dispatch, merge and unmerge."""

    adapters: nn.ModuleDict

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapters = nn.ModuleDict()
        # set by inject when the base weight is also another module's (tied embeddings and output head): merging
        # then writes into a private copy, so the other module keeps the weight it had unmerged
        self.shared_weight = False
        self._tied: tuple[nn.Parameter, ...] = ()  # the shared parameter while merged (a tuple: not registered)

    # -- the base layer's tensors, where models read them from the module (T5's feed-forward casts to
    # ``wo.weight.dtype``, Mamba reads ``in_proj.weight``); peft's layers answer these the same way
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # -- shapes ------------------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def linear_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight in linear form ``(out, in)``."""
        raise NotImplementedError

    def write_linear_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    # -- adapters ----------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, alpha: float, variant: str, dropout: float, init: str,
                    dtype: torch.dtype | None = None, lora_bias: bool = False) -> LoraAdapter:
        if name in self.adapters:
            raise LorakitError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        weight = self.linear_weight(torch.float32)
        # a float64 base gets float64 adapters (as in peft): read from the stored weight, since ``weight`` above is
        # already float32 (a float32 adapter there made float64 runs differ from peft's by ~1e-7, float32 rounding)
        stored = getattr(self.base_layer, "weight", None)
        dtype = dtype or (torch.float64 if getattr(stored, "dtype", None) == torch.float64 else torch.float32)
        adapter = LoraAdapter(self.in_features, self.out_features, rank, alpha, variant, dropout, dtype, weight.device,
                              lora_bias)
        self._init_adapter(adapter, init)
        adapter.variant.init_extra(adapter, self.linear_weight(dtype if dtype == torch.float64 else torch.float32))
        self.adapters[name] = adapter
        return adapter

    def _init_adapter(self, adapter: LoraAdapter, init: str) -> None:
        with torch.no_grad():
            if init == "gaussian":
                init_from_cpu(adapter.lora_A, lambda t: nn.init.normal_(t, std=1.0 / adapter.rank))
            elif init == "pissa":
                self._init_pissa(adapter)
            else:  # nn.Linear's default, as in PEFT
                init_from_cpu(adapter.lora_A, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))

    def _init_pissa(self, adapter: LoraAdapter) -> None:
        """PiSSA (Meng et al. 2024): A, B from the top-r singular triplets of W; W keeps only the residual."""
        if quant.is_quantized(self.base_layer):
            raise LorakitError("init='pissa' needs a dense base weight; quantize after training or use init='default'")
        weight = self.linear_weight(torch.float32)
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        r = adapter.rank
        root = (S[:r] / adapter.scaling).sqrt()
        adapter.lora_A.copy_(root.unsqueeze(1) * Vh[:r])
        adapter.lora_B.copy_(U[:, :r] * root.unsqueeze(0))
        self.write_linear_weight(weight - adapter.delta_weight())
        adapter.pissa_init = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())

    # -- forward -----------------------------------------------------------------------------------------------
    def _unmerged_active(self) -> list[str]:
        """The active adapters not merged into the base (read-only: may be ``self.active`` itself)."""
        if not self.merged:  # the training case: no list built per call
            return self.active
        return [n for n in self.active if n not in self.merged]

    def _adapter_forward(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[name]
        return adapter.variant.forward(adapter, self._adapter_input(x), base_out,
                                       lambda: self.unmerged_linear_weight(adapter.lora_A.dtype), self.bias)

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row through its own adapter (or none), in one call: the reference for mixed batches."""
        if self.merged:
            raise LorakitError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
        if isinstance(self, LoraLinear):  # inference over plain adapters: stacked SGMV kernels (None: not this batch)
            from lorakit.adapter_stack import stacked_mixed_forward

            fast = stacked_mixed_forward(self, x)
            if fast is not None:
                return fast
        result = self.base_layer(x)
        for name, rows in self._rows_by_adapter(x.shape[0]).items():
            if name is None:
                continue
            rows = rows.to(x.device)
            result = result.index_copy(0, rows, self._adapter_forward(name, x.index_select(0, rows), result.index_select(0, rows)))
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        if self.row_adapters is not None:
            return self._forward_mixed(x)
        names = self._unmerged_active()
        if self.merged and self.training and x.requires_grad and torch.is_grad_enabled():
            self._refuse_training_merged(names)
        if not names:
            return self.base_layer(x)
        result = self._first_output(names[0], x)
        for name in names[1:]:
            result = self._adapter_forward(name, x, result)
        return result

    def _refuse_training_merged(self, unmerged: list[str]) -> None:
        """A merged adapter is in W: its own tensors get no gradient, so training it would silently change nothing
        (peft trains nothing either). Checked in training forwards whose input carries gradients (a trainable
        module before this one, or Trainer's ``enable_input_require_grads`` under gradient checkpointing): with
        no trainable tensor on the way, backward already fails loudly. Refused when no unmerged active adapter
        is there to train instead."""
        trainable = lambda name: any(p.requires_grad for p in self.adapters[name].parameters())  # noqa: E731
        if any(trainable(n) for n in unmerged):
            return
        merged = [n for n in self.active if n in self.merged and trainable(n)]
        if merged:
            raise LorakitError(f"adapter {merged[0]!r} is merged into the base weight, so training would not change "
                               "it (its tensors get no gradient): call lorakit.unmerge(model) before training it, or "
                               "freeze its tensors to train other adapters over it")

    def _first_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._adapter_forward(name, x, self.base_layer(x))

    # -- merge -------------------------------------------------------------------------------------------------
    def unmerged_linear_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight in linear form without the adapters merged into it (their merges inverted in float32,
        newest first; nothing is changed): what DoRA's norm is taken of, in the forward and when merging, so that
        merging an adapter after others, or running it over merged ones, gives what the unmerged forward gives."""
        if not self.merged:
            return self.linear_weight(dtype)
        weight = self.linear_weight(torch.float32)
        for name in reversed(self.merged):
            adapter = self.adapters[name]
            weight = adapter.variant.unmerged_weight(adapter, weight, forget=False)
        return weight.to(dtype)

    def merged_candidate(self, name: str) -> torch.Tensor:
        """The float32 ``(out, in)`` weight this layer would hold after merging ``name`` (nothing is changed)."""
        adapter = self.adapters[name]
        # DoRA's norm is of the weight without earlier merges (computed only then: plain LoRA does not need it)
        unmerged = self.unmerged_linear_weight() if self.merged and not adapter.variant.plain else None
        return adapter.variant.merged_weight(adapter, self.linear_weight(torch.float32), unmerged)

    def merge(self, name: str, candidate: torch.Tensor | None = None, keep_original: bool = True) -> None:
        """Fold adapter ``name`` into the base weight. A quantized base is re-quantized, which rounds the update
        away in part: with ``keep_original`` its packed state is first copied to the CPU (half a byte per weight),
        so ``unmerge`` restores the base exactly instead of re-quantizing ``W' - delta``."""
        if name in self.merged or name not in self.adapters:
            return
        weight = self.merged_candidate(name) if candidate is None else candidate
        adapter = self.adapters[name]
        if adapter.lora_bias is not None and self.bias is None:
            raise LorakitError(f"adapter {name!r} has a trained bias on lora_B (lora_bias), but this "
                               f"{type(self.base_layer).__name__} has no bias to fold it into, so it cannot be merged "
                               "(peft refuses this merge too); run the adapter unmerged")
        if self.shared_weight and not self._tied:
            self._untie()
        if keep_original and not self.merged and quant.is_quantized(self.base_layer):
            self._quantized_original = {key: value.detach().to("cpu", copy=True)
                                        for key, value in self.base_layer.state_dict().items()}
        self.write_linear_weight(weight)
        if adapter.lora_bias is not None:
            self._merge_bias(adapter)
        self.merged.append(name)

    def _merge_bias(self, adapter: LoraAdapter) -> None:
        """Add the adapter's ``s * b`` (``Variant.merged_bias``) to the base bias ``(out,)``, in float32. The bias before the first such merge is kept, so ``unmerge`` restores it exactly."""
        bias = self.base_layer.bias
        if "_bias_original" not in self.__dict__:
            self._bias_original = bias.detach().clone()
        with torch.no_grad():
            bias.copy_((bias.float() + adapter.variant.merged_bias(adapter)).to(bias.dtype))

    def _untie(self) -> None:
        """Give the base its own copy of a shared weight; the shared one is kept for unmerge (exact, tied again)."""
        shared = self.base_layer.weight
        self._tied = (shared,)
        self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=False)

    def unmerge(self) -> None:
        bias = self.__dict__.pop("_bias_original", None)
        if bias is not None and self.merged:  # a lora_bias adapter was merged: the bias of before, bit for bit
            with torch.no_grad():
                self.base_layer.bias.copy_(bias)
        original = self.__dict__.pop("_quantized_original", None)
        if original is not None and self.merged:
            self.base_layer.load_state_dict(original)  # the exact packed base of before the first merge
            for name in self.merged:
                self.adapters[name].merge_norm = None
            self.merged = []
            return
        shared, self._tied = (self._tied or (None,))[0], ()
        current = getattr(self.base_layer, "weight", None)
        if shared is not None and (shared.dtype, shared.device) == (current.dtype, current.device):
            self.base_layer.weight = shared  # never written while merged: restored exactly, and tied again
            for name in self.merged:
                self.adapters[name].merge_norm = None
            self.merged = []
            return
        while self.merged:
            name = self.merged.pop()
            adapter = self.adapters[name]
            self.write_linear_weight(adapter.variant.unmerged_weight(adapter, self.linear_weight(torch.float32)))


class LoraLinear(LoraLayer):
    """LoRA on a linear layer: ``y = base(x) + s * dropout(x) A^T B^T`` (or the adapter's variant).

    x (..., in_features) -> (..., out_features).
    """

    @property
    def in_features(self) -> int:
        return quant.linear_shape(self.base_layer)[1]

    @property
    def out_features(self) -> int:
        return quant.linear_shape(self.base_layer)[0]

    def linear_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return quant.dense_weight(self.base_layer, dtype)

    def write_linear_weight(self, weight: torch.Tensor) -> None:
        quant.set_dense_weight(self.base_layer, weight)

    def _first_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[name]
        base = self.base_layer  # each submodule/parameter read goes through nn.Module.__getattr__: read once
        fusable = (adapter.variant.plain and isinstance(base, nn.Linear) and adapter.lora_bias is None
                   and not (self.training and isinstance(adapter.dropout, nn.Dropout)))
        if fusable and not base.weight.is_meta:  # one op for base + low-rank path, so a fused kernel can take it
            # (a meta weight is offloaded by accelerate: only the base's own forward loads it)
            return lora_linear(x, base.weight, base.bias, adapter.lora_A, adapter.lora_B, adapter.scaling)
        return super()._first_output(name, x)


class LoraEmbedding(LoraLayer):
    """LoRA on an embedding: ``y = E[ids] + s * A^T[ids] B^T`` with A (r, num_embeddings), B (dim, r) as in PEFT.

    ids (...) -> (..., embedding_dim). Dropout does not apply to embeddings (PEFT ignores it there too).
    DoRA works on the linear form ``E^T (dim, num_embeddings)``: one magnitude per embedding dimension (PEFT's
    ``DoraEmbeddingLayer``). Scaled embeddings (Gemma's ``embed_scale``, applied inside the base's forward) scale
    the adapter's output too, as PEFT does, so the unmerged forward equals the merged one.
    """

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def linear_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base_layer.weight.T.to(dtype)

    def write_linear_weight(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_layer.weight.copy_(weight.T.to(self.base_layer.weight.dtype))

    def add_adapter(self, name, rank, alpha, variant, dropout, init, dtype=None, lora_bias=False):
        if lora_bias:
            raise LorakitError("lora_bias=True is not supported on embedding layers (peft refuses it too); exclude the "
                               "embedding from target_modules or set lora_bias=False")
        if init == "pissa":
            raise LorakitError("init='pissa' is not supported on embedding layers; exclude the embedding from target_modules")
        adapter = super().add_adapter(name, rank, alpha, variant, 0.0, "default", dtype)
        with torch.no_grad():  # PEFT's embedding init: A zero, B normal (the product still starts at zero)
            nn.init.zeros_(adapter.lora_A)
            init_from_cpu(adapter.lora_B, nn.init.normal_)
        return adapter

    def embed_scale(self) -> torch.Tensor | None:
        """The scalar the base multiplies its lookups by (Gemma's ``embed_scale``), in the weight's dtype, or None."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scale = torch.tensor(float(scale))
        if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
            return None  # PEFT applies only scalar scales too
        weight = self.base_layer.weight
        return scale.to(device=weight.device, dtype=weight.dtype).reshape(())

    def _adapter_forward(self, name: str, ids: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[name]
        base = self.base_layer
        after_A = F.embedding(ids, adapter.lora_A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (..., r)
        low_rank = F.linear(after_A, adapter.lora_B) * adapter.scaling  # (..., dim)
        scale = self.embed_scale()
        if scale is not None:
            low_rank = low_rank * scale.to(low_rank.dtype)
        return adapter.variant.embedding_forward(adapter, low_rank, base_out, lambda: base(ids),
                                                 lambda: self.unmerged_linear_weight(adapter.lora_A.dtype))


class ModulesToSave(_AdapterHost):
    """A whole module trained and saved per adapter (PEFT's ``modules_to_save``), e.g. the output head.

    ``copies[name]`` is a trainable copy of the original; the active adapter's copy runs in its place.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.copies = nn.ModuleDict()

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    # -- the tensors of the module that runs now (the active copy, or the base when disabled or none is active),
    # for code that reads them from the module: TRL's fused head reads ``lm_head.weight``; peft's wrapper answers
    # the same way. A module without a weight has none here either (AttributeError, so hasattr is False).
    def _running(self) -> nn.Module:
        if self.disabled or not self.active or self.row_adapters is not None:
            return self.base_layer
        return self.copies[self.active[-1]]

    @property
    def weight(self) -> torch.Tensor:
        return self._running().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self._running(), "bias", None)

    def add_adapter(self, name: str) -> nn.Module:
        import copy

        if name in self.copies:
            raise LorakitError(f"adapter {name!r} already exists on this module")
        clone = copy.deepcopy(self.base_layer)
        for parameter in clone.parameters():
            parameter.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        self.active = [n for n in self.active if n != name]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        # any call signature: transformers calls some modules with keyword arguments only (an attention block as
        # self_attn(hidden_states=..., ...)), so the input need not be the first positional argument
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        if self.row_adapters is not None:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            groups = self._rows_by_adapter(x.shape[0]) if isinstance(x, torch.Tensor) else {}
            if len(groups) == 1:  # every row on one adapter (or none): its module on the whole batch
                name = next(iter(groups))
                return (self.copies[name] if name is not None else self.base_layer)(*args, **kwargs)
            if not args or not isinstance(x, torch.Tensor):
                raise LorakitError("mixed_batch: a module with a trained copy (modules_to_save) called with keyword "
                                   f"arguments only ({', '.join(kwargs)}) cannot split its rows among adapters; use one "
                                   "adapter at a time (lorakit.set_adapter)")
            count, tokens = x.shape[0], (x.shape[1] if x.ndim >= 3 else 0)
            parts = [(rows, (self.copies[name] if name is not None else self.base_layer)(
                *(_rows_of(a, rows, count, tokens) for a in args),
                **{k: _rows_of(v, rows, count, tokens) for k, v in kwargs.items()})) for name, rows in groups.items()]
            # outputs may be tuples: a copied MoE router returns (logits, scores, expert indices), each row by row
            return join_rows(parts, x.shape[0], "a module with a trained copy (modules_to_save)")
        return self._running()(*args, **kwargs)


def _rows_of(value: object, rows: torch.Tensor, count: int, tokens: int) -> object:
    """The part of a mixed batch's argument that belongs to ``rows`` (indices into the ``count`` rows of the input
    ``(count, tokens, ...)``): a tensor of ``count`` rows by those rows, one of ``count * tokens`` rows (the tokens
    flattened: DBRX's experts get the routing of each token as ``(count * tokens, k)``) by those rows' tokens;
    anything else whole. Without this a copied experts module ran each row group with the whole batch's routing (an
    IndexError)."""
    if not isinstance(value, torch.Tensor) or not value.ndim:
        return value
    rows = rows.to(value.device)
    if value.shape[0] == count:
        return value.index_select(0, rows)
    if tokens and value.shape[0] == count * tokens:
        return value.index_select(0, (rows[:, None] * tokens + torch.arange(tokens, device=value.device)).reshape(-1))
    return value


def join_rows(parts: list[tuple[torch.Tensor, object]], count: int, where: str) -> object:
    """Outputs of row groups ``[(row indices, output)]`` back into one output of ``count`` rows, for mixed batches
    (tensors whose first dimension is the group's size are joined; tuples and lists element by element; anything
    else is the first group's). ``where`` names the module kind in the error for an output that is not row by row."""
    sample = parts[0][1]
    if isinstance(sample, torch.Tensor):
        if not all(o.ndim and o.shape[0] == len(r) for r, o in parts):
            raise LorakitError(f"mixed_batch: {where} returned a tensor of shape {tuple(sample.shape)}, not one row per "
                               "input row, so rows cannot use different adapters there; use one adapter at a time "
                               "(lorakit.set_adapter)")
        joined = sample.new_zeros((count, *sample.shape[1:]))
        for rows, output in parts:
            joined = joined.index_copy(0, rows.to(output.device), output)
        return joined
    if isinstance(sample, (tuple, list)):
        items = [join_rows([(rows, output[i]) for rows, output in parts], count, where) for i in range(len(sample))]
        return type(sample)(items) if type(sample) in (tuple, list) else type(sample)(*items)
    return sample


LORA_HOSTS = (LoraLayer, ModulesToSave)
