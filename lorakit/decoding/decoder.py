"""Decode steps over a static KV cache with a few large kernels per layer, replayable as one CUDA graph.

transformers' forward runs ~50 kernels per decoder layer for one token (norms, rope and residuals as separate
elementwise kernels, a mask, K/V repeated to every query head), and its Python costs more than the GPU work at
decode batch sizes. ``StaticDecoder`` runs the same model, for one token per row, as:

    x = rmsnorm(h)                                   Triton rmsnorm
    qkv = x Wqkv^T (+ LoRA of q, k, v)               one GEMM + one grouped shrink/expand pair
    rope(q, k); K/V cache[row, :, position] = k, v   one Triton kernel
    a = attention(q, K/V cache[:length])             Triton flash-decoding (GQA, reads the valid cache once)
    h = h + a Wo^T (+ LoRA of o)                     addmm (residual in the GEMM) + one pair
    x = rmsnorm(h); gu = x Wgu^T (+ LoRA)            one GEMM + one pair
    h = h + swiglu(gu) Wd^T (+ LoRA of down)         swiglu, addmm + one pair

On an NF4 base the four GEMMs are ``lorakit.kernels.nf4_rows.nf4_rows_linear`` calls (the same residual epilogue):
fused kernels over the packed 4-bit weights for up to 16 rows (a matrix-vector kernel at 1-2, tensor cores above),
Triton dequantize + cuBLAS for more (the faster path at those row counts on an H200; docs/PERFORMANCE.md).

Other families change a few of these steps (``lorakit.decoding.architecture``): Phi-3's fused q/k/v and gate/up
modules are one-member groups; Gemma scales the embeddings, normalises with ``1 + weight`` and uses GeGLU
(``lorakit.kernels.geglu``); Gemma 2/3 normalise the attention and MLP outputs before their residual adds (no
addmm epilogue there), soft-cap attention scores inside the attention kernel and the logits after the head, and
Gemma 3 picks one of two rotary tables per layer. Sliding-window layers (Mistral, Phi-3, Qwen2/3's upper layers,
Gemma 2/3's local ones) pass their window to the attention kernel, which reads only the keys inside it: exact at any
length. The Llama step runs exactly the kernels listed above.

Rows (batch slots of the cache) are independent: each has a position (-1 = inactive: it computes garbage that is
never stored or read), a length, and an adapter slot (-1 = the base model). ``step`` uploads one small int tensor
(tokens, positions, adapter slots), replays the captured graph (CUDA) or runs the same code eagerly (elsewhere),
and returns the rows' next-token logits. Prompts enter the rows either through ``prefill`` (the same fused layers
over all the prompts' tokens, eager, causal attention per prompt) or, prefilled by transformers
(``lorakit.generation.prefill``), through ``admit``, which copies their K/V in.

On CUDA each LoRA pair runs on a second stream beside its base GEMM, into a scratch that the next kernel (rope + KV
store, add + RMSNorm, SwiGLU) adds as it reads the GEMM's output (``lora_overlap``). On GPUs with programmatic
dependent launch (Hopper on), the step's kernels launch with it (``pdl``): each is scheduled while the previous one
drains and reads its weights before it waits for the previous kernel's output; the base GEMMs are then Triton's
(``lorakit.kernels.rows_linear``) so that they take part.

Shapes: rows B (``max_batch``), cache length S (``max_len``), hidden d, heads H x head_dim D, kv heads Hkv.
Cache: K, V (layers, B, Hkv, S, D) in the model's dtype.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.decoding.adapters import DecodeAdapters
from lorakit.decoding.architecture import model_parts, norm_eps
from lorakit.decoding.prefix_cache import PREFIX_BLOCK, PrefixCache
from lorakit.decoding.weights import fuse_projections
from lorakit.errors import LorakitError
from lorakit.kernels._triton import programmatic_launches


class StaticDecoder:
    """One model's static-cache decoder: ``admit`` prefilled rows, ``step`` them, ``release`` finished ones.

    Args:
        model: a supported causal LM (``static_decoding_unsupported(model)`` says why not), in eval mode.
        max_batch: rows of the cache (concurrent sequences).
        max_len: tokens per row (prompt + generated).
        graph: capture the step in a CUDA graph (default: on CUDA when the Triton kernels run there).
        adapter_slots: initial adapter capacity (grows on demand; growing re-captures the graph).
        lora_overlap: "lora" (the default on CUDA): each LoRA pair runs on a second stream beside its base GEMM,
            into a scratch that the next kernel (rope + KV store, add + RMSNorm, SwiGLU) adds as it reads the GEMM's
            output; "serial": the same data flow on one stream (the pair before the GEMM); "off" (the default
            elsewhere): the pair adds into the GEMM's output after it. Off CUDA, "lora" is "serial".
        pdl: launch the step's kernels with programmatic dependent launch (default: on where the GPU and Triton
            support it; ignored elsewhere).
        fuse_lora: with ``lora_overlap`` "lora" or "serial", rope + KV store expands the q/k/v LoRA itself from
            the shrink's planes: one launch and one (B, N) delta round trip fewer per layer (steps up to 9% faster
            on an H200, docs/PERFORMANCE.md). Not with q/k/v biases, DoRA, q/k norms (Qwen3, Gemma 3: they come
            first), or Phi-3's single fused qkv_proj adapter.
        prefix_cache: tokens of K/V kept for automatic prefix caching (``lorakit.decoding.prefix_cache``): a prompt
            whose first blocks of 16 tokens an earlier prompt (or answer) under the same adapter and salt had gets
            their K/V copied instead of computed. Default: a quarter of the row cache (``max_batch * max_len / 4``
            tokens, as much memory); 0: off.

    The model's q/k/v and gate/up weights become views of fused tensors (values and keys unchanged; see
    ``lorakit.decoding.weights``). An NF4 base (lorakit ``NF4Linear``, QLoRA) is read in place: each projection
    group is one ``lorakit.kernels.nf4_rows.nf4_rows_linear`` call over the packed 4-bit weights,
    with the block scales decoded to float32 once at build (about 9% of the 4-bit weights' memory on top). Adapters are copied from the model's LoRA layers the first time a row uses them
    (by name), and the layers' tensors then become views of that copy (one copy on the device; see
    ``lorakit.decoding.adapters``). An adapter deleted and added again under the same name is loaded again on its
    next use; one changed in place (new tensors assigned to its modules, or a DoRA adapter's values, whose norms
    are computed at load) must be reloaded with ``reload_adapter(name)``.
    """

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, graph: bool | None = None,
                 adapter_slots: int = 8, lora_overlap: str | None = None, pdl: bool | None = None,
                 fuse_lora: bool = True, prefix_cache: int | None = None):
        self.parts = parts = model_parts(model, max_len)
        if max_batch < 1 or max_len < 2:
            raise LorakitError(f"a static decoder needs max_batch >= 1 and max_len >= 2, got {max_batch} and {max_len}")
        self.model = model
        weight = parts.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_batch, self.max_len = max_batch, max_len
        from lorakit.kernels._triton import triton_usable

        # the references of the kernels (LORAKIT_DISABLE_TRITON=1, or no Triton) sync the host: no graph capture then
        self.use_graph = (self.device.type == "cuda" and triton_usable(weight)) if graph is None else bool(graph)
        cuda = self.device.type == "cuda"
        overlap = ("lora" if cuda else "off") if lora_overlap is None else lora_overlap
        if overlap not in ("lora", "serial", "off"):
            raise LorakitError(f"lora_overlap must be 'lora', 'serial' or 'off', got {overlap!r}")
        self.lora_overlap = overlap
        self.pdl = True if pdl is None else bool(pdl)  # kernels check the device (``pdl_on``) at each launch
        self.fuse_lora = bool(fuse_lora)
        # elsewhere "lora" keeps the same data flow (delta scratch, fused adds) on the one stream
        self._lora_stream = torch.cuda.Stream(self.device) if cuda and overlap == "lora" else None
        self.weights = [self._fuse(layer) for layer in parts.layers]
        self.adapters = DecodeAdapters(parts, self.weights, adapter_slots, 16, self.dtype, self.device)
        L, B, S, Hkv, D = len(parts.layers), max_batch, max_len, parts.kv_heads, parts.head_dim
        self.k_cache = torch.zeros(L, B, Hkv, S, D, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        capacity = B * S // 4 if prefix_cache is None else int(prefix_cache)
        if capacity < 0:
            raise LorakitError(f"prefix_cache is a number of tokens (0: off), got {prefix_cache}")
        self.prefix = PrefixCache(L, Hkv, D, capacity, self.dtype, self.device) if capacity >= PREFIX_BLOCK else None
        # one rotary table per key (Gemma 3: local and global bases, by layer type; else one)
        self._rope = {key: self._rope_table(S, key) for key in parts.rope_keys}
        self.cos, self.sin = self._rope[parts.rope_keys[0]]
        # the step's inputs (one upload per step) and output: fixed buffers, so a captured graph reads them
        self.inputs = torch.zeros(3, B, dtype=torch.int64, device=self.device)  # token, position, adapter slot
        self.logits = torch.zeros(B, parts.vocab, dtype=torch.float32, device=self.device)
        self._host = torch.zeros(3, B, dtype=torch.int64)
        if self.device.type == "cuda":
            self._host = self._host.pin_memory()
        self.lengths = [0] * B  # tokens in each row's cache (host copy; -1 marks a free row)
        self.active = [False] * B
        # rows part way through a chunked prefill (``prefill`` with ``upto``): held (active) but not stepped
        self.filling = [False] * B
        # whether each row holds the K/V of every position before its length in every layer: not a row admitted
        # from a cache whose sliding layers kept only their window (the prefix cache must not keep such a row)
        self.whole = [True] * B
        self.reused = [0] * B  # leading prompt tokens of each row's last prefill that the prefix cache copied
        # per row, the (adapter, load serial) its K/V were computed under (``_prefix_root``'s first two parts): a
        # row whose adapter was reloaded or replaced, or whose base weights changed, while it ran holds K/V of the
        # old weights, which ``remember`` must not keep under the new load. None: admitted, adopted at first use;
        # _STALE: never kept
        self._kv_source: list = [None] * B
        # captured CUDA graphs, by what they hold (``_graph_kind``): the step's, and the prefill's per token-count
        # bucket (sharing one memory pool); all of them go when the adapter stacks are reallocated
        self._graphs: dict = {}
        self._prefill_graphs: dict = {}
        self._graphs_version = self.adapters.version
        self._prefill_last = self._prefill_logits = self._pool = None
        self._structure = _structure_version()

    # -- set-up ------------------------------------------------------------------------------------------------
    def _fuse(self, layer) -> dict:
        return {group: fuse_projections([layer.projections[p] for p in members], self.dtype)
                for group, members in self.parts.groups}

    def _rope_table(self, length: int, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (S, D) float32 for positions 0..S-1, from the model's own rotary module (all its scalings);
        ``key``: Gemma 3's layer type (its rotary module keeps one table per type)."""
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            cos, sin = self.parts.rotary(probe, positions) if key is None else self.parts.rotary(probe, positions, key)
        width = self.parts.rotary_dim or self.parts.head_dim
        if cos.shape[-1] != width:
            raise LorakitError(f"the rotary table is {cos.shape[-1]} wide, not the {width} rotated dims of a head; "
                               "static decoding cannot run this model's rope")
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def _sync_structure(self) -> None:
        """lorakit put modules into the model or took them out since (adapters injected, loaded, deleted): read
        its projection modules again (the base linears, and so the fused weights, stay the same objects)."""
        version = _structure_version()
        if version != self._structure:
            self.parts = self.adapters.parts = model_parts(self.model, self.max_len)
            self.adapters.drop_replaced()
            self.refresh()
            self._structure = version

    def refresh(self) -> None:
        """Fuse again the weights of layers whose modules were given new weight tensors since."""
        for i, layer in enumerate(self.parts.layers):
            if not all(fused.is_current() for fused in self.weights[i].values()):
                self.weights[i] = self._fuse(layer)
                self.drop_graphs()
                if self.prefix is not None:  # K/V computed with the old weights
                    self.prefix.clear()
                    self._kv_source = [_STALE] * self.max_batch  # the rows' too
        self.adapters.weights = self.weights

    def unservable(self, name: str | None) -> str | None:
        """Why rows on adapter ``name`` cannot decode here (one line), or None when they can."""
        self._sync_structure()
        if name is None:
            return None
        module = next((path for path, host in self.parts.foreign.items() if name in host.adapter_names()), None)
        if module is None:
            return None
        return (f"adapter {name!r} also changes {module}; the static decoder serves adapters on the attention and MLP "
                "projections only (use --decoder transformers)")

    def reload_adapter(self, name: str) -> None:
        """Copy adapter ``name`` from the model again (after its weights were changed in place)."""
        self.adapters.load(name)

    # -- rows --------------------------------------------------------------------------------------------------
    def free_rows(self) -> list[int]:
        return [row for row in range(self.max_batch) if not self.active[row]]

    def admit(self, rows: Sequence[int], batch, members: Sequence[int] | None = None) -> None:
        """Copy prefilled sequences into cache rows: ``batch`` is a ``lorakit.generation.KVBatch`` (left-padded);
        its row ``members[j]`` (default j) goes to cache row ``rows[j]``."""
        self._sync_structure()
        members = list(range(len(rows))) if members is None else list(members)
        layers = batch._kv_layers()
        if len(layers) != len(self.parts.layers):
            raise LorakitError(f"the prefilled cache has {len(layers)} layers, the model {len(self.parts.layers)}")
        lengths = batch.mask.sum(dim=1).tolist()
        width = batch.length
        whole = all(layer.keys.shape[2] == width for layer in layers)
        for row, member in zip(rows, members):
            if self.active[row]:
                raise LorakitError(f"cache row {row} is in use; release it first")
            if lengths[member] >= self.max_len:
                raise LorakitError(f"a prompt of {lengths[member]} tokens does not fit the decoder's {self.max_len}-token rows")
        with torch.no_grad():
            rows_t = torch.tensor(list(rows), device=self.device)
            members_t = torch.tensor(members, device=self.device)
            length_t = torch.tensor([lengths[m] for m in members], device=self.device)
            positions = torch.arange(width, device=self.device)[None, :]
            for i, layer in enumerate(layers):
                # a sliding layer of transformers' cache keeps only its last n = min(width, window - 1) columns:
                # those are all the next query (at position length) attends; the positions before stay unread
                n = layer.keys.shape[2]
                window = self.parts.layers[i].window
                if n != width and (window is None or n < min(window - 1, width)):
                    raise LorakitError(f"the prefilled cache's layer {i} holds {n} of its {width} columns; the static "
                                       "decoder needs all of them (or a sliding layer's last window - 1)")
                # position j of the static row holds the prompt's j-th real token, at column j + n - length of the
                # layer's (left-padded, right-aligned) columns: the padding and what precedes a window are skipped
                cols = (positions + (n - length_t)[:, None]).clamp(0, n - 1)
                index = cols[:, None, :, None]
                for source, cache in ((layer.keys, self.k_cache[i]), (layer.values, self.v_cache[i])):
                    picked = source.index_select(0, members_t)
                    picked = torch.gather(picked, 2, index.expand(-1, picked.shape[1], -1, picked.shape[3]))
                    cache[:, :, :width].index_copy_(0, rows_t, picked.to(cache.dtype))
        for row, member in zip(rows, members):
            self.lengths[row], self.active[row], self.whole[row], self.reused[row] = lengths[member], True, whole, 0
            self.filling[row], self._kv_source[row] = False, None

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
                salts: Sequence[str | None] | None = None, upto: Sequence[int] | None = None) -> torch.Tensor:
        """Run ``prompts[j]`` (token ids) through adapter ``adapters[j]`` into free cache row ``rows[j]``; returns
        (n, V) float32 next-token logits of each prompt's last token. The rows then decode with ``step``.

        Chunked prefill: with ``upto[j]`` < len(prompts[j]), only the prompt's first ``upto[j]`` tokens go into
        the row, which stays held (``filling``: not free, not stepped) until a later call with the same row,
        prompt, adapter and salt continues it from there (only its next tokens run); the logits are then those of
        the last token run. A server spreads a long prompt over several steps this way, so the rows decoding
        beside it wait for one chunk at a time instead of the whole prompt.

        With the prefix cache on, a prompt's longest cached prefix (whole blocks, same adapter and ``salts[j]``,
        vLLM's ``cache_salt``: prompts under different salts never share K/V) is copied into its row and only the
        rest runs through the layers; its full blocks are kept for later prompts after.

        One pass over all the prompts' tokens with the decoder's own layers (fused projections, grouped LoRA with a
        slot per token) instead of transformers' forward, whose ~50 kernels per layer and Python cost most of the
        time of a server's newcomers (a few short prompts). Each token's K/V go straight to (its row, its position).
        Prompts of up to ``PREFILL_KERNEL_MAX_PROMPT`` tokens (after tokens already in the row: as much attention
        work, queries x keys) attend with the decode kernels (each token over its row's cache up to itself) and, on CUDA with up to ``PREFILL_GRAPH_MAX_TOKENS`` tokens in all, the pass is
        the replay of a CUDA graph captured once per power-of-two token count; longer prompts run eagerly with
        causal ``scaled_dot_product_attention`` per prompt.
        """
        n = len(rows)
        if not (n == len(prompts) == len(adapters)) or n == 0:
            raise LorakitError(f"prefill needs one prompt and one adapter name per row (at least one), got {n} rows, "
                               f"{len(prompts)} prompts and {len(adapters)} adapter names")
        if len(set(rows)) != n or any(not 0 <= row < self.max_batch for row in rows):
            raise LorakitError(f"prefill rows must be distinct cache rows in 0..{self.max_batch - 1}, got {list(rows)}")
        upto = [len(p) for p in prompts] if upto is None else [int(u) for u in upto]
        if len(upto) != n:
            raise LorakitError(f"prefill's upto needs one token count per row, got {len(upto)} for {n} rows")
        vocab = self.parts.embed.weight.shape[0]
        for row, prompt, end in zip(rows, prompts, upto):
            if self.active[row] and not self.filling[row]:
                raise LorakitError(f"cache row {row} is in use; release it first")
            if not 0 < len(prompt) < self.max_len:
                raise LorakitError(f"a prompt of {len(prompt)} tokens does not fit the decoder's {self.max_len}-token rows "
                                   "(it needs 1 to max_len - 1 tokens)")
            done = self.lengths[row] if self.filling[row] else 0
            if not done < end <= len(prompt):
                raise LorakitError(f"cache row {row} holds {done} of its prompt's {len(prompt)} tokens: upto must be "
                                   f"in {done + 1}..{len(prompt)}, got {end}")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise LorakitError(f"prompt token ids must be in 0..{vocab - 1}, got {min(prompt)}..{max(prompt)}")
        from lorakit.inject import adapter_names

        self._sync_structure()
        for name in dict.fromkeys(adapters):
            reason = self.unservable(name)
            if reason is not None:
                raise LorakitError(reason)
        present = adapter_names(self.model) if any(a is not None and a not in self.adapters for a in adapters) else ()
        slot_of_prompt = self.adapters.slots_for(adapters, present)
        salts = [None] * n if salts is None else list(salts)
        # a chunk ends the prompt there: the rest is the next call's
        cut = [list(p[:end]) if end < len(p) else p for p, end in zip(prompts, upto)]
        whole = [end == len(p) for p, end in zip(prompts, upto)]
        return self._prefill(list(rows), cut, list(adapters), salts, slot_of_prompt, split=True, whole=whole)

    def _prefill(self, rows: list[int], prompts: list, adapters: list, salts: list, slot_of_prompt: list[int],
                 split: bool, whole: list[bool]) -> torch.Tensor:
        """``prefill`` of checked arguments (``prompts`` cut at ``upto``; ``whole[j]``: prompt j is complete).
        ``split``: prompts that share uncached blocks with an earlier prompt of the call (a request's n choices,
        clients arriving together with one new system prompt) wait for a second pass, which finds those blocks
        kept by the first."""
        n = len(rows)
        fresh = [j for j in range(n) if not self.filling[rows[j]]]  # rows that start here (the others continue)
        if split and self.prefix is not None and len(fresh) > 1:
            later = self.prefix.plan([self._prefix_root(adapters[j], salts[j]) for j in fresh],
                                     [prompts[j] for j in fresh])[0]
            later = {fresh[j] for j in later}
            if later:
                out = torch.empty(n, self.parts.vocab, dtype=torch.float32, device=self.device)
                for wave in ([j for j in range(n) if j not in later], sorted(later)):
                    parts = ([items[j] for j in wave]
                             for items in (rows, prompts, adapters, salts, slot_of_prompt, whole))
                    *head, part_whole = parts
                    out[wave] = self._prefill(*head, split=False, whole=part_whole)
                return out
        # leading tokens of each prompt already in its row: the prefix cache's copy, or a filling row's earlier chunks
        cached = [self.lengths[row] if self.filling[row] else 0 for row in rows]
        if self.prefix is not None:
            with torch.no_grad():
                for j in fresh:
                    blocks = self.prefix.lookup(self._prefix_root(adapters[j], salts[j]), prompts[j])
                    self.prefix.copy_in(blocks, self.k_cache, self.v_cache, rows[j])
                    cached[j] = len(blocks) * self.prefix.block
        lengths = [len(p) - c for p, c in zip(prompts, cached)]  # the tokens each prompt runs through the layers
        T = sum(lengths)
        starts = [0, *itertools.accumulate(lengths[:-1])]
        # the flat token table: token id, position in its prompt, cache row, adapter slot
        flat = torch.tensor([[t for p, c in zip(prompts, cached) for t in p[c:]],
                             [i for p, c in zip(prompts, cached) for i in range(c, len(p))],
                             [row for row, length in zip(rows, lengths) for _ in range(length)],
                             [s for s, length in zip(slot_of_prompt, lengths) for _ in range(length)]], dtype=torch.long)
        last = torch.tensor([start + length - 1 for start, length in zip(starts, lengths)], dtype=torch.long)
        # a prompt's attention work: its queries x the keys they read (the row's earlier tokens too: a cached prefix,
        # earlier chunks); past a 256-token fresh prompt's, SDPA per prompt (reads K/V once per block of queries,
        # where the decode kernels read it once per query: a 6,144-token prompt in chunks of 512 took 5x its whole
        # prefill through them on an H200)
        if max(n * (c + n) for n, c in zip(lengths, cached)) > PREFILL_KERNEL_MAX_PROMPT ** 2:
            logits = self._prefill_eager(flat.to(self.device), last.to(self.device), rows, starts, lengths, cached)
        elif self.use_graph and T <= PREFILL_GRAPH_MAX_TOKENS:
            logits = self._prefill_graphed(flat, last)
        else:
            logits = self._prefill_eager(flat.to(self.device), last.to(self.device))
        for j, (row, prompt, adapter) in enumerate(zip(rows, prompts, adapters)):
            source = self._prefix_root(adapter, None)[:2]
            if self.filling[row]:  # the earlier chunks' K/V: kept only if computed under the same load
                self._kv_source[row] = source if self._kv_source[row] == source else _STALE
            else:
                self.active[row], self.whole[row], self.reused[row] = True, True, cached[j]
                self._kv_source[row] = source
            self.lengths[row], self.filling[row] = len(prompt), not whole[j]
        for row, prompt, adapter, salt in zip(rows, prompts, adapters, salts):
            self.remember(row, prompt, adapter, salt)
        return logits

    def _prefix_root(self, adapter: str | None, salt: str | None) -> tuple:
        """What a prompt's first block is keyed under besides its tokens: the adapter as loaded now (a reload or
        another adapter under the name gets a new serial) and the salt."""
        return adapter, (self.adapters.serial_of.get(adapter, -1) if adapter is not None else 0), salt

    def prefill_tokens(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None],
                       salts: Sequence[str | None]) -> int:
        """How many tokens ``prefill`` of these prompts would run through the model now: what the prefix cache
        holds, and the blocks prompts of the call share with an earlier one, are copies (nothing is marked used)."""
        if self.prefix is None:
            return sum(len(p) for p in prompts)
        return self.prefix.plan([self._prefix_root(a, s) for a, s in zip(adapters, salts)], prompts)[1]

    def cached_tokens(self, prompt: Sequence[int], adapter: str | None, salt: str | None) -> int:
        """Leading tokens of ``prompt`` whose K/V the prefix cache holds now, which a prefill of it would copy
        (nothing is marked used); 0 without a prefix cache."""
        if self.prefix is None:
            return 0
        return len(self.prefix.lookup(self._prefix_root(adapter, salt), prompt, touch=False)) * self.prefix.block

    def remember(self, row: int, tokens: Sequence[int], adapter: str | None, salt: str | None = None) -> None:
        """Keep the K/V of the full blocks of ``tokens`` (the sequence whose K/V row ``row`` holds, cut at the row's
        length) in the prefix cache, for later prompts that start the same way: the engine calls it with a
        finished row's prompt + answer, so the next turn of a conversation finds its history."""
        if self.prefix is None or not self.active[row] or not self.whole[row] or \
                (adapter is not None and adapter not in self.adapters):
            return
        root = self._prefix_root(adapter, salt)
        if self._kv_source[row] is None:  # admitted: computed by the model as it is now
            self._kv_source[row] = root[:2]
        if self._kv_source[row] != root[:2]:  # computed (in part) under other weights
            return
        with torch.no_grad():
            self.prefix.remember(root, list(tokens[:self.lengths[row]]), self.k_cache, self.v_cache, row)

    def _prefill_eager(self, flat, last, rows=None, starts=None, lengths=None, cached=None) -> torch.Tensor:
        """The prefill pass, eager: ``_prefill_forward`` with the decode kernels (rows=None), or with causal SDPA per
        prompt (rows, starts, lengths, cached given: long prompts, where each token reading its row's cache would
        re-read the prompt's K/V once per token; ``cached[j]`` tokens of prompt j already in its row)."""
        out = torch.empty(last.shape[0], self.parts.vocab, dtype=torch.float32, device=self.device)
        with torch.inference_mode(), programmatic_launches(self.pdl):
            self._prefill_forward(flat, last, out, None if rows is None else (rows, starts, lengths, cached))
        return out

    def _prefill_graphed(self, flat: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The prefill pass as the replay of a CUDA graph captured for the token count's bucket (a power of two from
        16: padding tokens have position -1, store and attend nothing and have no adapter)."""
        T, n = flat.shape[1], last.shape[0]
        bucket = max(16, 1 << (T - 1).bit_length())
        key = (self._graph_kind(), bucket)
        if self._prefill_last is None:
            self._prefill_last = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
            self._prefill_logits = torch.zeros(self.max_batch, self.parts.vocab, dtype=torch.float32, device=self.device)
        entry = self._prefill_graphs.get(key)
        if entry is None:
            inputs = torch.zeros(4, bucket, dtype=torch.long, device=self.device)
            inputs[1].fill_(-1)  # warm-up and capture store nothing
            inputs[3].fill_(-1)

            def forward(inputs=inputs):
                with programmatic_launches(self.pdl):
                    self._prefill_forward(inputs, self._prefill_last, self._prefill_logits)

            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # the buckets' graphs never run at once: one pool
            # the capture's runs read the last call's indices, which a larger bucket left out of this one's range
            self._prefill_last.zero_()
            entry = self._prefill_graphs[key] = (inputs, self._capture_graph(forward, self._pool))
        inputs, graph = entry
        host = torch.empty(4, bucket, dtype=torch.long)
        host[:, :T] = flat
        host[0, T:], host[1, T:], host[2, T:], host[3, T:] = 0, -1, 0, -1
        inputs.copy_(host)
        index = torch.zeros(self.max_batch, dtype=torch.long)
        index[:n] = last  # the rest point at token 0: stale indices of a larger bucket would be out of range
        self._prefill_last.copy_(index)
        graph.replay()
        return self._prefill_logits[:n].clone()

    def _graph_kind(self) -> tuple[bool, bool, bool]:
        """What a captured graph holds beyond buffer addresses: whether any adapter is loaded (without one, the
        graph runs no LoRA kernel at all), whether one is DoRA (the ratio multiply) and whether one has a lora_B bias
        (its add). Graphs of each kind are
        kept, so a server switching between base-only and adapter batches captures each once. A reallocated
        adapter stack (``DecodeAdapters.version``) invalidates every graph: they hold the old buffers."""
        if self.adapters.version != self._graphs_version:
            self.drop_graphs()
            self._graphs_version = self.adapters.version
        return bool(self.adapters.slot_of), self.adapters.has_dora, self.adapters.has_lora_bias

    def drop_graphs(self) -> None:
        """Forget every captured graph (captured again on next use) and the prefill graphs' memory pool. The pool
        goes with them: once its last graph is freed, PyTorch releases the pool, and capturing into the old handle
        fails an allocator assert (and leaves the CUDA RNG in capture mode for every other thread)."""
        self._graphs, self._prefill_graphs, self._pool = {}, {}, None

    def _prefill_forward(self, flat: torch.Tensor, last: torch.Tensor, out: torch.Tensor, per_prompt=None) -> None:
        """All layers over the flat tokens (4, T) (token, position, cache row, slot), storing every token's K/V at
        (row, position); out[:n] <- the float32 logits of the tokens at ``last`` (n,)."""
        from lorakit.kernels.decode_attention import decode_attention, expand_qkv_lora, rope_store_

        tokens, positions, cache_rows, slots = flat[0], flat[1], flat[2], flat[3].to(torch.int32)
        lengths = torch.where(positions >= 0, positions + 1, 0).to(torch.int32)
        tables = self._rope_rows(positions)

        def attend(i, layer, q, k, v, delta, lora=None):  # each token attends its row's cache up to its own position
            cos, sin = tables[layer.rope]
            if self.parts.rotary_dim:
                q, k, v, cos, sin = self._rotate_part(q, k, v, delta, lora, cos, sin, tables[_IDENTITY])
                delta = lora = None
            rope_store_(q, k, v, cos, sin, positions, self.k_cache[i], self.v_cache[i], delta=delta, rows=cache_rows,
                        lora=lora)
            return decode_attention(q, self.k_cache[i], self.v_cache[i], lengths, layer.scaling, rows=cache_rows,
                                    **_attention_options(layer))

        def attend_per_prompt(i, layer, q, k, v, delta, lora=None):
            rows, starts, prompt_lengths, cached = per_prompt
            cos, sin = tables[layer.rope]
            if lora is not None:
                delta = expand_qkv_lora(q, k, lora)
            if delta is not None:
                q, k, v = q + delta[0], k + delta[1], v + delta[2]
            q = _rotary_float(q, cos, sin).to(q.dtype)
            self.k_cache[i][cache_rows, :, positions] = _rotary_float(k, cos, sin).to(self.k_cache.dtype)
            self.v_cache[i][cache_rows, :, positions] = v.to(self.v_cache.dtype)
            result = torch.empty_like(q)
            gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
            for row, start, length, offset in zip(rows, starts, prompt_lengths, cached):
                qj = q[start:start + length].transpose(0, 1).unsqueeze(0)  # (1, H, L, D): positions offset.. on
                kj = self.k_cache[i][row, :, :offset + length].unsqueeze(0)  # (1, Hkv, offset + L, D)
                vj = self.v_cache[i][row, :, :offset + length].unsqueeze(0)
                window = layer.window if layer.window is not None and layer.window < offset + length else None
                if layer.softcap is None and window is None and offset == 0:
                    oj = F.scaled_dot_product_attention(qj, kj, vj, is_causal=True, scale=layer.scaling, **gqa)
                else:  # soft-capping (SDPA has none), a window the prompt outgrows, or queries after a cached
                    # prefix or earlier chunks (SDPA's is_causal aligns the first query with the first key; its
                    # causal_lower_right mask, K/V repeated for GQA, ran 1.5x slower on an H200): by query blocks
                    oj = _blocked_causal_attention(qj, kj, vj, layer.scaling, layer.softcap, window, offset)
                result[start:start + length] = oj[0].transpose(0, 1)
            return result

        h, delta = self._layers(self._embed(tokens), slots, attend if per_prompt is None else attend_per_prompt)
        h = h.index_select(0, last)
        delta = None if delta is None else delta.index_select(0, last)
        x = self._norm(h, self.parts.final_norm, delta)
        out[:last.shape[0]].copy_(self._head(x))

    def release(self, rows: Sequence[int]) -> None:
        for row in rows:
            self.active[row], self.filling[row], self.lengths[row] = False, False, 0

    def warm_up(self, full: bool | None = None) -> None:
        """Compile the kernels and capture the graphs that a first request would otherwise wait for (on an H200, a
        batch shape first seen by a server cost up to 1.4 s; docs/PERFORMANCE.md).

        ``full=False``: a one-token prompt through ``prefill`` and one ``step``, on the base model. ``full`` (the
        default on CUDA; elsewhere nothing is compiled or captured ahead, and Triton's CPU interpreter would spend
        minutes on the passes) also runs a prefill at each token-count bucket the free rows can fill (16 ..
        ``PREFILL_GRAPH_MAX_TOKENS``; each its own graph and kernel shapes), one over more tokens (the eager
        pass) and one long prompt (per-prompt attention) where ``max_len`` allows; all on the base model and again
        through a placeholder adapter (``DecodeAdapters.hold``: every projection, rank ``r_max``, zero weights) so
        the grouped LoRA kernels and the adapter graphs are ready too. The placeholder is evicted and the rows are
        released after (their cache holds garbage, which no later row reads: each stores before it attends).
        Call it before admitting requests: it needs a free row."""
        free = self.free_rows()
        if not free:
            raise LorakitError("warm_up needs a free cache row; call it before admitting requests")
        self._sync_structure()
        full = self.device.type == "cuda" if full is None else full
        passes = [[1]] + (self._warm_up_prompts(len(free)) if full else [])
        prefix, self.prefix = self.prefix, None  # its prompts of zeros must run whole (each bucket), and stay unkept
        try:
            for name in (None, WARM_UP_ADAPTER) if full else (None,):
                if name is not None:
                    self.adapters.hold(name)
                for i, lengths in enumerate(passes):
                    rows = free[:len(lengths)]
                    try:
                        logits = self.prefill(rows, [[0] * n for n in lengths], [name] * len(rows))
                        if i == 0:
                            self.step(rows, logits.argmax(-1).tolist(), [name] * len(rows))
                    finally:
                        self.release(rows)
        finally:
            self.prefix = prefix
            if WARM_UP_ADAPTER in self.adapters:
                self.adapters.evict(WARM_UP_ADAPTER)

    def _warm_up_prompts(self, rows: int) -> list[list[int]]:
        """Prompt lengths of the warm-up's prefill passes over at most ``rows`` rows: exactly each graph bucket's
        token count, then more tokens than the graphs take (eager), then one prompt longer than the decode
        kernels attend over (SDPA per prompt); the passes the rows or ``max_len`` cannot hold are left out."""
        longest = min(PREFILL_KERNEL_MAX_PROMPT, self.max_len - 1)

        def split(total):  # ``total`` tokens in prompts of at most ``longest``
            lengths = [longest] * (total // longest) + ([total % longest] if total % longest else [])
            return lengths if len(lengths) <= rows else None

        totals = [16 << k for k in range((PREFILL_GRAPH_MAX_TOKENS // 16).bit_length())]
        passes = [split(total) for total in totals + [PREFILL_GRAPH_MAX_TOKENS + 16]]
        if self.max_len - 1 > PREFILL_KERNEL_MAX_PROMPT:
            passes.append([PREFILL_KERNEL_MAX_PROMPT + 1])
        return [p for p in passes if p]

    # -- stepping ----------------------------------------------------------------------------------------------
    def step(self, rows: Sequence[int], tokens: Sequence[int], adapters: Sequence[str | None]) -> torch.Tensor:
        """Feed ``tokens[j]`` to cache row ``rows[j]`` (through adapter ``adapters[j]``); returns (len(rows), V)
        float32 next-token logits. Rows not named here do not move."""
        if not (len(rows) == len(tokens) == len(adapters)):
            raise LorakitError(f"step needs one token and one adapter per row, got {len(rows)} rows, {len(tokens)} "
                               f"tokens and {len(adapters)} adapter names")
        for row in rows:
            if not self.active[row]:
                raise LorakitError(f"cache row {row} holds no sequence; admit a prefilled one first")
            if self.filling[row]:
                raise LorakitError(f"cache row {row} holds only part of its prompt; prefill the rest first")
            if self.lengths[row] >= self.max_len:
                raise LorakitError(f"cache row {row} is full ({self.max_len} tokens)")
        from lorakit.inject import adapter_names

        self._sync_structure()
        present = adapter_names(self.model) if any(a is not None and a not in self.adapters for a in adapters) else ()
        for name in dict.fromkeys(adapters):
            reason = self.unservable(name)
            if reason is not None:
                raise LorakitError(reason)
        slots = self.adapters.slots_for(adapters, present)
        for row, adapter in zip(rows, adapters) if self.prefix is not None else ():  # this step's K/V: the
            source = self._prefix_root(adapter, None)[:2]  # adapter as loaded now
            if self._kv_source[row] is None:
                self._kv_source[row] = source
            elif self._kv_source[row] != source:
                self._kv_source[row] = _STALE
        host = self._host
        host.zero_()
        host[1].fill_(-1)
        index = torch.tensor(list(rows), dtype=torch.long)
        host[0, index] = torch.tensor(list(tokens), dtype=torch.int64)
        host[1, index] = torch.tensor([self.lengths[r] for r in rows], dtype=torch.int64)
        host[2, index] = torch.tensor(slots, dtype=torch.int64)
        self.inputs.copy_(host)  # blocking: the host buffer is rewritten next step
        self._run()
        for row in rows:
            self.lengths[row] += 1
        return self.logits.index_select(0, index.to(self.device))

    def _run(self) -> None:
        if not self.use_graph:
            with torch.inference_mode(), programmatic_launches(self.pdl):
                self._forward()
            return
        key = self._graph_kind()
        graph = self._graphs.get(key)
        if graph is None:
            saved = self.inputs.clone()
            self.inputs[1].fill_(-1)  # warm-up and capture store nothing: every row inactive
            graph = self._graphs[key] = self._capture_graph(self._pdl_forward)
            self.inputs.copy_(saved)
        graph.replay()

    @staticmethod
    def _capture_graph(forward, pool=None) -> "torch.cuda.CUDAGraph":
        """Capture ``forward()`` (after two warm-up runs on a side stream, which compile the Triton kernels)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
            forward()
        return graph

    # -- the step ----------------------------------------------------------------------------------------------
    def _pdl_forward(self) -> None:
        with programmatic_launches(self.pdl):
            self._forward()

    def _forward(self) -> None:
        from lorakit.kernels.decode_attention import decode_attention, rope_store_

        parts = self.parts
        tokens, positions, slots = self.inputs[0], self.inputs[1], self.inputs[2].to(torch.int32)
        lengths = torch.where(positions >= 0, positions + 1, 0).to(torch.int32)
        tables = self._rope_rows(positions)

        def attend(i, layer, q, k, v, delta, lora=None):  # one new token per row: rotate, store at its position, attend
            cos, sin = tables[layer.rope]
            if self.parts.rotary_dim:
                q, k, v, cos, sin = self._rotate_part(q, k, v, delta, lora, cos, sin, tables[_IDENTITY])
                delta = lora = None
            rope_store_(q, k, v, cos, sin, positions, self.k_cache[i], self.v_cache[i], delta=delta, lora=lora)
            return decode_attention(q, self.k_cache[i], self.v_cache[i], lengths, layer.scaling,
                                    **_attention_options(layer))

        h, delta = self._layers(self._embed(tokens), slots, attend)
        x = self._norm(h, parts.final_norm, delta)
        self.logits.copy_(self._head(x))

    def _rope_rows(self, positions: torch.Tensor) -> dict:
        """Each rotary table's rows (cos, sin (T, D) float32) at ``positions`` (T,) (-1: inactive, reads row 0)."""
        safe = positions.clamp(min=0)
        tables = {key: (cos.index_select(0, safe), sin.index_select(0, safe)) for key, (cos, sin) in self._rope.items()}
        if self.parts.rotary_dim:  # whole-head identity rows: rope_store_ then only stores (see ``_rotate_part``)
            shape = (positions.shape[0], self.parts.head_dim)
            tables[_IDENTITY] = (torch.ones(shape, device=self.device), torch.zeros(shape, device=self.device))
        return tables

    def _rotate_part(self, q, k, v, delta, lora, cos, sin, identity):
        """Partial rotary (Phi-3 / Phi-4-mini with ``partial_rotary_factor`` < 1): the first r = cos.shape[1] dims of
        each q and k head rotate (rotate_half over those r), the rest pass, as transformers' Phi-3. Done here in
        float32 and rounded once (as ``rope_store_`` does for whole heads), in place on q and k, after adding the
        LoRA delta; returns (q, k, v, identity cos, identity sin) for ``rope_store_``, which then only stores k, v."""
        from lorakit.kernels.decode_attention import expand_qkv_lora, rotate_half_float

        if lora is not None:
            delta = expand_qkv_lora(q, k, lora)
        if delta is not None:
            q.add_(delta[0].to(q.dtype))
            k, v = k + delta[1].to(k.dtype), v + delta[2].to(v.dtype)
        r = cos.shape[1]
        q[..., :r] = rotate_half_float(q[..., :r], cos, sin).to(q.dtype)
        k[..., :r] = rotate_half_float(k[..., :r], cos, sin).to(k.dtype)
        return q, k, v, *identity

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (T,) -> h (T, d); Gemma multiplies by sqrt(d) rounded to the weights' dtype, as transformers."""
        h = F.embedding(tokens, self.parts.embed.weight)
        return h if self.parts.embed_scale is None else h * self.parts.embed_scale

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) -> logits (T, V) in the model's dtype; soft-capped (Gemma 2) in that dtype, as transformers."""
        logits = x @ self.parts.lm_head.weight.t()
        cap = self.parts.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _norm(self, h: torch.Tensor, module, delta: torch.Tensor | None) -> torch.Tensor:
        """The model's RMSNorm (Llama's, or Gemma's ``1 + weight``) of h (T, d), a delta still to add added first."""
        parts = self.parts
        if parts.norm_offset == 0.0:
            return _norm(h, module, self._eps, delta)
        return _norm(h, module, self._eps, delta, parts.norm_offset, parts.norm_cast_first)

    def _layers(self, h: torch.Tensor, slots: torch.Tensor, attend) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every decoder layer over rows h (T, d) with adapter slots (T,) int32 (-1: none). ``attend(i, layer, q, k,
        v, delta, lora=None)`` rotates q and k, stores k and v in layer i's cache and returns the attention (T, H,
        D); q (T, H, D), k, v (T, Hkv, D) are views of the q/k/v output, delta None or views of the LoRA delta
        still to add to them, and lora None or that LoRA still to expand (``rope_store_``'s ``lora``). Returns the
        residual stream (T, d) and the delta still to add to it (or None)."""
        from lorakit.kernels.geglu import geglu_packed
        from lorakit.kernels.swiglu import swiglu_packed

        parts = self.parts
        activation = swiglu_packed if parts.activation == "silu" else geglu_packed
        T = h.shape[0]
        H, Hkv, D = parts.heads, parts.kv_heads, parts.head_dim
        Nq, Nkv = H * D, Hkv * D

        def heads(t):
            return t[:, :Nq].view(T, H, D), t[:, Nq:Nq + Nkv].view(T, Hkv, D), t[:, Nq + Nkv:].view(T, Hkv, D)

        delta = None
        for i, layer in enumerate(parts.layers):
            x = self._norm(h, layer.input_norm, delta)
            if self._fused_qkv(i):
                # the q/k/v GEMM beside its shrink; rope + KV store expands the planes itself
                qkv, part = self._project(x, i, "qkv", slots, shrink_only=True)
                stack = self.adapters.layers[i]["qkv"]
                attn = attend(i, layer, *heads(qkv), None, lora=(part, stack.B, stack.scaling, stack.rank, slots))
            else:
                qkv, delta = self._project(x, i, "qkv", slots)
                if layer.q_norm is not None and delta is not None:
                    qkv.add_(delta)  # the q/k norms come first: no kernel to fuse the add into
                    delta = None
                q, k, v = heads(qkv)
                if layer.q_norm is not None:
                    q, k = layer.q_norm(q).contiguous(), layer.k_norm(k).contiguous()
                attn = attend(i, layer, q, k, v, None if delta is None else heads(delta))
            if layer.attn_out_norm is None:
                h, delta = self._project(attn.reshape(T, Nq), i, "o", slots, residual=h)
            else:  # Gemma 2/3: the attention output is normalised before the residual add
                out, delta = self._project(attn.reshape(T, Nq), i, "o", slots)
                h, delta = h + self._norm(out, layer.attn_out_norm, delta), None
            x = self._norm(h, layer.post_norm, delta)
            gate_up, delta = self._project(x, i, "gate_up", slots)
            act = activation(gate_up, delta)  # (T, 2F) -> (T, F)
            if layer.mlp_out_norm is None:
                h, delta = self._project(act, i, "down", slots, residual=h)
            else:
                out, delta = self._project(act, i, "down", slots)
                h, delta = h + self._norm(out, layer.mlp_out_norm, delta), None
        return h, delta

    @property
    def _eps(self) -> float:
        return norm_eps(self.parts.final_norm, 1e-6)

    def _dora(self, stack) -> bool:
        return stack.ratio is not None and self.adapters.has_dora

    def _lora_bias(self, stack) -> bool:
        return stack.lora_bias is not None and self.adapters.has_lora_bias

    def _fused_qkv(self, layer: int) -> bool:
        """Whether layer ``layer``'s q/k/v LoRA expand runs inside rope + KV store (``fuse_lora``): not with q/k/v
        biases, a DoRA adapter, an adapter's lora_B bias, or q/k norms (Qwen3: they come before rope) there."""
        return (self.fuse_lora and bool(self.adapters.slot_of) and self.lora_overlap in ("lora", "serial")
                and self.parts.layers[layer].q_norm is None and self.weights[layer]["qkv"].bias is None
                and len(self.weights[layer]["qkv"].splits) == 3  # not Phi-3's one fused qkv_proj adapter
                and not self._dora(self.adapters.layers[layer]["qkv"])
                and not self._lora_bias(self.adapters.layers[layer]["qkv"]))

    def _project(self, x: torch.Tensor, layer: int, group: str, slots: torch.Tensor,
                 residual: torch.Tensor | None = None, shrink_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One projection group: (residual +) bias + [DoRA ratio *] (x W^T + LoRA deltas [+ s b, peft's lora_bias]).
        x (B, K) -> (y, delta)
        with y (B, N). delta is None, or (with ``lora_overlap="lora"``) the (B, N) LoRA delta computed on the side
        stream that the caller still adds to y, inside the kernel that reads y next.

        ``shrink_only`` (``lora_overlap`` "lora"/"serial" only; no bias, no DoRA, no lora_B bias on this group): only the shrink runs
        beside the GEMM, and the result is (y, its planes (P, B, G*R) float32) for a kernel that expands them itself."""
        from lorakit.kernels.grouped_lora import grouped_lora_add_, grouped_shrink, grouped_shrink_planes
        from lorakit.kernels.rows_linear import rows_linear

        fused = self.weights[layer][group]
        stack = self.adapters.layers[layer][group]
        use_lora = bool(self.adapters.slot_of)
        dora = self._dora(stack)
        # s b of each row's adapter (rows without one read the last row of zeros), in the output's dtype
        lora_bias = (stack.lora_bias.index_select(0, slots.remainder(stack.lora_bias.shape[0])).to(x.dtype)
                     if self._lora_bias(stack) else None)
        args = (stack.A, stack.B, stack.scaling, stack.rank, slots, fused.splits)
        overlap = use_lora and self.lora_overlap in ("lora", "serial")
        side = self._lora_stream if overlap else None
        if overlap:
            # the LoRA pair on a second stream while the GEMM runs: both are bound by memory bandwidth, and each
            # alone leaves SMs idle while it ramps up and drains. Its output buffer is allocated here, on the main
            # stream, before the fork; the main stream waits for the side stream before reading it.
            if shrink_only:
                out = torch.empty(grouped_shrink_planes(x, stack.A), x.shape[0], stack.A.shape[1], dtype=torch.float32,
                                  device=x.device)
            else:
                out = torch.empty(x.shape[0], sum(fused.splits), dtype=x.dtype, device=x.device)

            def lora_side():
                if shrink_only:
                    grouped_shrink(x, stack.A, stack.rank, slots, len(fused.splits), out=out)
                else:
                    grouped_lora_add_(out, x, *args, accumulate=False)

            if side is None:
                lora_side()
            else:
                main = torch.cuda.current_stream(self.device)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    lora_side()
        # the residual add inside the GEMM's epilogue
        residual_in = residual if residual is not None and not dora else None
        # NF4 base (QLoRA): one nf4_rows_linear call per group (fused kernels up to 16 rows, dequantize + BLAS above)
        y = rows_linear(x, fused.weight, residual_in) if fused.nf4 is None else fused.matmul(x, residual_in)
        if overlap:
            if side is not None:
                main.wait_stream(side)
            delta = out
            if lora_bias is not None and not shrink_only:
                delta.add_(lora_bias)
            if shrink_only or (not dora and fused.bias is None):
                return y, delta
            y.add_(delta)
        elif use_lora:
            grouped_lora_add_(y, x, *args)
            if lora_bias is not None:
                y.add_(lora_bias)
        if dora:
            # rows without an adapter (-1) read the last row of ones
            y = (y.float() * stack.ratio.index_select(0, slots.remainder(stack.ratio.shape[0]))).to(y.dtype)
        if fused.bias is not None:
            y = y + fused.bias
        if residual is not None and dora:
            y = residual + y
        return y, None


# a row's K/V source that matches no adapter load: its K/V mix weights, the prefix cache never keeps them
_STALE = ("\0stale",)
# the placeholder adapter of ``StaticDecoder.warm_up``: no user adapter can have this name (a NUL byte)
WARM_UP_ADAPTER = "\0lorakit-warm-up"
# prefill: prompts up to this many tokens attend with the decode kernels (each token reads its row's cache up to
# itself: quadratic in the prompt, cheap when short); longer ones with causal SDPA per prompt (a prompt after
# tokens already in its row: when its tokens x its keys exceed this squared). Up to
# PREFILL_GRAPH_MAX_TOKENS tokens in all, on CUDA, the pass is a CUDA graph replay (one per power-of-two bucket).
PREFILL_KERNEL_MAX_PROMPT = 256
PREFILL_GRAPH_MAX_TOKENS = 512
# queries per block of the long-prompt prefill's soft-capped or windowed attention (``_blocked_causal_attention``):
# its float32 scores are H x 512 x (512 + window) per block, not H x L x L (8 GiB for 32 heads at L = 8192)
PREFILL_ATTENTION_BLOCK = 512


def _norm(h: torch.Tensor, module, default_eps: float, delta: torch.Tensor | None, offset: float = 0.0,
          cast_first: bool = True) -> torch.Tensor:
    """RMSNorm of the residual stream h (T, d); a LoRA delta still to add goes into h first (in place). ``offset``
    and ``cast_first``: ``lorakit.kernels.rmsnorm``'s ``offset`` / ``cast_before_weight`` (Gemma: 1, False)."""
    from lorakit.kernels.rmsnorm import add_rms_norm_, rms_norm

    eps = norm_eps(module, default_eps)
    if offset == 0.0 and cast_first:
        return rms_norm(h, module.weight, eps) if delta is None else add_rms_norm_(h, delta, module.weight, eps)
    if delta is None:
        return rms_norm(h, module.weight, eps, offset, cast_first)
    return add_rms_norm_(h, delta, module.weight, eps, offset, cast_first)


_IDENTITY = ("identity",)  # the key of the identity rotary rows (never a layer type)


def _rotary_float(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) rotated in float32 by rows cos, sin (T, r): the first r dims of each head (rotate_half over
    them), the rest passed through (r < D: Phi-3's partial rotary)."""
    from lorakit.kernels.decode_attention import rotate_half_float

    r = cos.shape[-1]
    if r == x.shape[-1]:
        return rotate_half_float(x, cos, sin)
    return torch.cat([rotate_half_float(x[..., :r], cos, sin), x[..., r:].float()], dim=-1)


def _attention_options(layer) -> dict:
    """decode_attention's keyword arguments for a layer: its soft-cap and sliding window, where it has them."""
    options = {}
    if layer.softcap is not None:
        options["softcap"] = layer.softcap
    if layer.window is not None:
        options["window"] = layer.window
    return options


def _blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              softcap: float | None, window: int | None, offset: int = 0) -> torch.Tensor:
    """Causal attention of one prompt, q (1, H, L, D) at positions ``offset .. offset + L - 1``, k, v
    (1, Hkv, offset + L, D) -> (1, H, L, D) in q's dtype, with
    Gemma 2's logit soft-capping (``softcap``: scores and softmax in float32, as transformers' eager attention) and/or
    a sliding window (query i attends keys i - window < j <= i, transformers' mask).

    Queries go by blocks of ``PREFILL_ATTENTION_BLOCK``, each over the keys it can see (from its first query's
    window start to its last query): memory O(block x (block + window)) instead of the whole L x L scores, and a
    windowed layer computes O(L x window) scores. Each query's softmax is over the same keys either way.
    """
    length = q.shape[2]
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = torch.empty_like(q)
    for first in range(0, length, PREFILL_ATTENTION_BLOCK):
        end = min(length, first + PREFILL_ATTENTION_BLOCK)
        low = 0 if window is None else max(0, offset + first - window + 1)
        queries = torch.arange(offset + first, offset + end, device=q.device)[:, None]
        keys = torch.arange(low, offset + end, device=q.device)[None, :]
        allowed = keys <= queries  # (block, keys)
        if window is not None:
            allowed &= keys > queries - window
        qb, kb, vb = q[:, :, first:end], k[:, :, low:offset + end], v[:, :, low:offset + end]
        if softcap is None:
            out[:, :, first:end] = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=scale, **gqa)
        else:
            out[:, :, first:end] = _softcap_attention(qb, kb, vb, scale, softcap, allowed)
    return out


def _softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float,
                       allowed: torch.Tensor) -> torch.Tensor:
    """Attention with logit soft-capping, as transformers' eager Gemma 2 attention: q (1, H, Lq, D), k, v
    (1, Hkv, Lk, D), allowed (Lq, Lk) bool -> (1, H, Lq, D) in q's dtype; scores and softmax in float32."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def _structure_version() -> int:
    from lorakit.inject import _STRUCTURE_VERSION

    return _STRUCTURE_VERSION[0]


