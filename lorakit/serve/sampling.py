"""Batched sampling for the serving engine: one call draws the next token of every sampled row of a decode step.

Each row keeps its own temperature, top-p, top-k and ``torch.Generator`` (a request's seed must give the same
answer whatever else shares its batch), so the only work done row by row is drawing that row's random numbers
(one ``exponential_`` from its generator); top-k, temperature, softmax, the nucleus and the draw itself run over
the whole ``(m, V)`` block at once, whatever mask each row's format left on its logits.

The draw is torch.multinomial's own method for one sample, ``argmax(p / q)`` with ``q ~ Exp(1)`` per token (the
exponential race: token j wins with probability ``p_j / sum(p)``), written out so each row's ``q`` comes from its
own generator. On the CPU a row without top-p therefore gets exactly the token ``torch.multinomial(p, 1,
generator)`` gives (lorakit.generation.sample: tested); with top-p the nucleus is not renormalised first (the race
needs no normalised ``p``), which changes nothing but the last bits of near-ties. A row's token depends only on
its own logits and generator: every operation here is row-wise (softmax, cumsum, a stable sort, argmax, top-k's
exact values), none reduces across rows, so neighbours never change it.
"""

from __future__ import annotations

import torch


# On the CPU rows are drawn in blocks of about this many bytes of float32 logits, so a block's buffers stay in the
# cache (one (32, 128k) pass after another through memory cost ~40% more host time than row by row); on a GPU
# all rows are one block: there each operation is a kernel launch, and a block per row would be a launch per row.
CPU_BLOCK_BYTES = 1 << 20


def sample_rows(logits: torch.Tensor, temperature: list[float], top_p: list[float], top_k: list[int],
                generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits (m, V)`` (refused tokens at -inf), row i with ``temperature[i] > 0``,
    ``top_p[i]`` in (0, 1], ``top_k[i]`` (0: all tokens) and ``generators[i]`` (None: torch's default).

    Returns ``(tokens (m,) int64, ok (m,) bool)`` on the logits' device, without a host sync (the caller copies
    them with the rest of the step); ``ok`` is False for a row whose logits leave nothing to draw from (NaN, or
    every token at -inf), whose token is then meaningless.
    """
    rows, width = logits.shape
    block = rows if logits.device.type != "cpu" else max(1, CPU_BLOCK_BYTES // (4 * width))
    if block >= rows:
        return _draw(logits, temperature, top_p, top_k, generators)
    parts = [_draw(logits[a:a + block], temperature[a:a + block], top_p[a:a + block], top_k[a:a + block],
                   generators[a:a + block]) for a in range(0, rows, block)]
    return torch.cat([tokens for tokens, _ in parts]), torch.cat([ok for _, ok in parts])


def _draw(logits: torch.Tensor, temperature: list[float], top_p: list[float], top_k: list[int],
          generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_rows` over one block of rows, every operation over the whole block."""
    rows, width = logits.shape
    device = logits.device
    x = logits
    ks = [k if 0 < k < width else 0 for k in top_k]
    if any(ks):  # all but each row's k largest to -inf (ties with the k-th stay)
        picked = [i for i, k in enumerate(ks) if k]
        index = torch.tensor(picked, device=device)
        part = x[index]
        kth = torch.topk(part, max(ks[i] for i in picked), dim=-1).values
        kth = kth.gather(1, torch.tensor([ks[i] - 1 for i in picked], device=device).unsqueeze(1))
        x = x.clone()
        x[index] = part.masked_fill(part < kth, float("-inf"))
    # shifted so each row's best token scores 0: a tiny temperature then gives -inf elsewhere, never inf - inf = NaN
    x = (x - x.max(dim=-1, keepdim=True).values).float()  # a new tensor: the caller's logits stay as they are
    scale = torch.tensor(temperature, dtype=torch.float32, device=device).unsqueeze(1)
    probs = torch.softmax(x.div_(scale), dim=-1)  # in place: the buffer is this function's own
    weights, order, index = probs, None, None
    nucleus = [i for i, p in enumerate(top_p) if p < 1.0]
    if nucleus:  # these rows in descending order: keep tokens until the mass before them reaches top_p
        whole = len(nucleus) == rows
        index = None if whole else torch.tensor(nucleus, device=device)
        ranked, order = torch.sort(probs if whole else probs[index], dim=-1, descending=True, stable=True)
        mass = torch.tensor([top_p[i] for i in nucleus], dtype=torch.float32, device=device).unsqueeze(1)
        ranked.mul_((torch.cumsum(ranked, dim=-1) - ranked) < mass)  # the first token always stays
        if whole:
            weights = ranked
        else:
            weights = probs.clone()
            weights[index] = ranked
    race = torch.empty((rows, width), dtype=torch.float32, device=device)
    for row, generator in enumerate(generators):  # the one per-row call: each row's numbers from its own stream
        race[row].exponential_(generator=generator)
    choice = torch.argmax(torch.div(weights, race, out=race), dim=-1)
    # a NaN weight wins the argmax, and a row of zeros picks a zero: the drawn weight says whether there was anything
    # to draw from (one element per row, not another pass over (m, V))
    ok = weights.gather(1, choice.unsqueeze(1)).squeeze(1) > 0
    if order is not None:  # a position in the sorted row -> the token
        if index is None:
            choice = order.gather(1, choice.unsqueeze(1)).squeeze(1)
        else:
            choice[index] = order.gather(1, choice[index].unsqueeze(1)).squeeze(1)
    return choice, ok
