"""Automatic prefix caching for the static decoder: K/V of prompt blocks seen before are copied, not computed.

Chat traffic repeats itself: every request of a conversation starts with the same system prompt, and each turn
re-sends the whole conversation so far. ``PrefixCache`` keeps the K/V of full blocks of ``block`` tokens in a pool
of its own; a new prompt whose first blocks were seen (same tokens, same adapter as loaded, same ``cache_salt``)
gets their K/V copied into its cache row and only the rest of the prompt is run through the model.

A block's key is ``(parent, tokens)``: the key serial of the block before it (the first block's parent is the
request's ``root``: adapter, the adapter's load serial and the salt) and the block's own token ids, compared
exactly (no hash that two prompts could share). Serials are never reused, so when a block is evicted the blocks
after it become unreachable, never wrong; they age out like any other. Eviction is least recently used: a lookup
marks every block of the matched chain as used, its last block as the least recent of them, so a chain loses its
tail before its head (a chain without its head would be unreachable).

Shapes: layers L, blocks N (``capacity // block``), kv heads Hkv, ``block`` tokens, head dim D.
Pool: K, V (L, N, Hkv, block, D) in the cache's dtype. Row cache (the decoder's): (L, B, Hkv, S, D).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Hashable, Sequence

import torch

# Tokens per block: the granularity of a hit (vLLM's default block size too)
PREFIX_BLOCK = 16


class PrefixCache:
    """A pool of ``capacity`` tokens of K/V, in blocks of ``block`` tokens, keyed by the tokens that precede them.

    ``lookup`` -> blocks to ``copy_in`` to a row before its prefill; ``remember`` a row's full blocks after.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device,
                 block: int = PREFIX_BLOCK):
        self.block = block
        blocks = max(0, capacity // block)
        self.k = torch.zeros(layers, blocks, kv_heads, block, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._entries: OrderedDict[tuple, tuple[int, int]] = OrderedDict()  # key -> (pool block, serial); LRU first
        self._free = list(range(blocks - 1, -1, -1))
        self._serials = itertools.count(1)
        self.hits = self.queries = 0  # prompt tokens served from the pool / looked up (GET /health reports them)

    @property
    def blocks(self) -> int:
        return self.k.shape[1]

    def clear(self) -> None:
        """Forget every block (the model's weights changed: their K/V would be stale)."""
        self._entries.clear()
        self._free = list(range(self.blocks - 1, -1, -1))

    def lookup(self, root: Hashable, tokens: Sequence[int], touch: bool = True) -> list[int]:
        """Pool blocks holding the K/V of the longest cached prefix of ``tokens`` under ``root``, leaving at least
        one token to compute (the prefill needs the last token's logits). ``touch``: mark them recently used and
        count the lookup in ``hits`` / ``queries``."""
        found, chain, parent = [], [], root
        usable = (len(tokens) - 1) // self.block
        for j in range(usable):
            key = (parent, tuple(tokens[j * self.block:(j + 1) * self.block]))
            entry = self._entries.get(key)
            if entry is None:
                break
            found.append(entry[0])
            chain.append(key)
            parent = entry[1]
        if touch:
            self._touch(chain)
            self.queries += len(tokens)
            self.hits += len(found) * self.block
        return found

    def _touch(self, chain: list) -> None:
        """Mark a chain's blocks most recently used, its head the most recent of them (evicted last)."""
        for key in reversed(chain):
            self._entries.move_to_end(key)

    def plan(self, roots: Sequence[Hashable], prompts: Sequence[Sequence[int]], least: int = 2
             ) -> tuple[list[int], int]:
        """How one prefill of ``prompts`` (under ``roots``) would go: the indices of the followers, prompts that
        share at least ``least`` full blocks the pool lacks with an earlier prompt of the list (not itself a
        follower), which a second pass prefills after those so that they find the blocks kept; and how many
        tokens both passes run through the model in all. Nothing is marked used. Matching uses Python's hash of
        each chain: a collision only changes which pass a prompt goes in, never which K/V it gets (``lookup``
        compares tokens exactly)."""
        leading: set[int] = set()  # chained hashes of the leaders' full blocks
        later, computed = [], 0
        for j, (root, tokens) in enumerate(zip(roots, prompts)):
            chain, h = [], hash(root)
            for k in range(len(tokens) // self.block):
                h = hash((h, tuple(tokens[k * self.block:(k + 1) * self.block])))
                chain.append(h)
            usable = (len(tokens) - 1) // self.block
            # a leader keeps its first blocks only up to the pool's size: a follower copies no more than those
            shared = min(next((k for k in range(usable) if chain[k] not in leading), usable), self.blocks)
            cached = len(self.lookup(root, tokens, touch=False))
            if shared - cached >= least:
                later.append(j)
            else:
                leading.update(chain)
            computed += len(tokens) - self.block * max(cached, shared if shared - cached >= least else 0)
        return later, computed

    def copy_in(self, blocks: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor, row: int) -> None:
        """Write pool ``blocks`` to positions ``0 .. len(blocks) * block`` of cache row ``row`` (all layers)."""
        if not blocks:
            return
        index = torch.tensor(blocks, device=self.k.device)
        n = len(blocks) * self.block
        for pool, cache in ((self.k, k_cache), (self.v, v_cache)):
            picked = pool.index_select(1, index)  # (L, m, Hkv, block, D)
            cache[:, row, :, :n] = picked.permute(0, 2, 1, 3, 4).reshape(cache.shape[0], cache.shape[2], n, -1)

    def remember(self, root: Hashable, tokens: Sequence[int], k_cache: torch.Tensor, v_cache: torch.Tensor,
                 row: int) -> None:
        """Keep the full blocks of ``tokens``, whose K/V cache row ``row`` holds at positions 0..len(tokens) - 1,
        that the pool lacks (evicting the least recently used blocks for room)."""
        if self.blocks == 0:
            return
        parent, chain, new = root, [], []  # chain: every key of the prompt's blocks; new: (block j, key) to write
        for j in range(min(len(tokens) // self.block, self.blocks)):  # a prompt longer than the pool: its first blocks
            key = (parent, tuple(tokens[j * self.block:(j + 1) * self.block]))
            entry = self._entries.get(key)
            if entry is None:
                entry = (-1, next(self._serials))
                self._entries[key] = entry  # placed now, its pool block given below
                new.append((j, key))
            chain.append(key)
            parent = entry[1]
        self._touch(chain)
        if not new:
            return
        protect = set(chain)  # evicting a block of this chain would make the blocks after it unreachable
        pool_blocks = []
        for j, key in new:
            if not self._free:
                self._evict_one(protect)
            slot = self._free.pop()
            self._entries[key] = (slot, self._entries[key][1])
            pool_blocks.append(slot)
        index = torch.tensor(pool_blocks, device=self.k.device)
        positions = torch.tensor([j * self.block + t for j, _ in new for t in range(self.block)], device=k_cache.device)
        for pool, cache in ((self.k, k_cache), (self.v, v_cache)):
            L, _, Hkv, _, D = cache.shape
            picked = cache[:, row].index_select(2, positions).reshape(L, Hkv, len(new), self.block, D)
            pool.index_copy_(1, index, picked.permute(0, 2, 1, 3, 4).to(pool.dtype))

    def _evict_one(self, protect: set) -> None:
        """Free the least recently used block that is not in ``protect`` (the chain being written)."""
        for key in self._entries:
            if key not in protect:
                slot, _ = self._entries.pop(key)
                self._free.append(slot)
                return
        raise RuntimeError("prefix cache: nothing to evict")  # unreachable: a chain is at most the pool's size
