"""Batched sampling for the serving engine: one call draws the next token of every sampled row of a decode step.

Each row keeps its own temperature, top-p, top-k and ``torch.Generator`` (a request's seed must give the same
answer whatever else shares its batch), so the only work done row by row is drawing a seeded row's random numbers
(one ``exponential_`` from its generator; the rows without one share a single call on torch's default stream);
top-k, temperature, softmax, the nucleus and the draw itself run over the whole ``(m, V)`` block at once, whatever
mask each row's format left on its logits.

The draw is torch.multinomial's own method for one sample, ``argmax(p / q)`` with ``q ~ Exp(1)`` per token (the
exponential race: token j wins with probability ``p_j / sum(p)``), written out so each row's ``q`` comes from its
own generator. On the CPU a row without top-p therefore gets exactly the token ``torch.multinomial(p, 1,
generator)`` gives (lorakit.generation.sample: tested); with top-p the nucleus is not renormalised first (the race
needs no normalised ``p``), which changes nothing but the last bits of near-ties. A row's token depends only on
its own logits and generator: every operation here is row-wise (softmax, cumsum, a stable sort, argmax, top-k's
exact values), none reduces across rows, so neighbours never change it.

vLLM's extensions act here too, as vLLM defines them: ``min_p`` (after the temperature, tokens whose probability
is under ``min_p`` x the row's largest are dropped, before top-k / top-p: the nucleus is then taken of what is
left), and, on the logits before any of this (:func:`keep_only`, :func:`hold_back`, :func:`penalize_rows`),
``allowed_token_ids``, ``min_tokens`` and ``repetition_penalty`` (:class:`RowOptions` holds a request's values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# On the CPU rows are drawn in blocks of about this many bytes of float32 logits, so a block's buffers stay in the
# cache (one (32, 128k) pass after another through memory cost ~40% more host time than row by row); on a GPU
# all rows are one block: there each operation is a kernel launch, and a block per row would be a launch per row.
CPU_BLOCK_BYTES = 1 << 20


def sample_rows(logits: torch.Tensor, temperature: list[float], top_p: list[float], top_k: list[int],
                generators: list[torch.Generator | None], min_p: list[float] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits (m, V)`` (refused tokens at -inf), row i with ``temperature[i] > 0``,
    ``top_p[i]`` in (0, 1], ``top_k[i]`` (0: all tokens), ``generators[i]`` (None: torch's default) and
    ``min_p[i]`` in [0, 1] (None, 0: off).

    Returns ``(tokens (m,) int64, ok (m,) bool)`` on the logits' device, without a host sync (the caller copies
    them with the rest of the step); ``ok`` is False for a row whose logits leave nothing to draw from (NaN, or
    every token at -inf), whose token is then meaningless.
    """
    rows, width = logits.shape
    min_p = min_p if min_p is not None and any(min_p) else [0.0] * rows
    block = rows if logits.device.type != "cpu" else max(1, CPU_BLOCK_BYTES // (4 * width))
    if block >= rows:
        return _draw(logits, temperature, top_p, top_k, generators, min_p)
    parts = [_draw(logits[a:a + block], temperature[a:a + block], top_p[a:a + block], top_k[a:a + block],
                   generators[a:a + block], min_p[a:a + block]) for a in range(0, rows, block)]
    return torch.cat([tokens for tokens, _ in parts]), torch.cat([ok for _, ok in parts])


def _draw(logits: torch.Tensor, temperature: list[float], top_p: list[float], top_k: list[int],
          generators: list[torch.Generator | None], min_p: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
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
    floored = [i for i, p in enumerate(min_p) if p > 0]
    if floored:  # vLLM's min_p, before the nucleus: which is then the nucleus of the tokens left, renormalised
        index = torch.tensor(floored, device=device)
        part = probs[index]
        bar = part.amax(dim=-1, keepdim=True) * torch.tensor([min_p[i] for i in floored], dtype=torch.float32,
                                                             device=device).unsqueeze(1)
        part.mul_(part >= bar)  # the best token always stays (min_p <= 1)
        probs[index] = part.div_(part.sum(dim=-1, keepdim=True))
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
    if any(generator is None for generator in generators):  # rows without a stream of their own: one call for all
        race.exponential_()
    for row, generator in enumerate(generators):  # the one per-row call: a seeded row's numbers from its own stream
        if generator is not None:
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


# -- vLLM's logits processors, on the logits before the draw (each row keeps its own values) -----------------------
@dataclass(frozen=True)
class RowOptions:
    """A request's vLLM sampling options, as the engine applies them to each of its rows (their defaults: off).

    ``repetition_penalty`` (> 0): the logit of every token of the prompt or the answer so far is divided by it when
    positive, multiplied when negative (CTRL's penalty, as vLLM and transformers apply it); ``min_p``: see
    :func:`sample_rows`; ``min_tokens``: until the answer has that many tokens, the end tokens ``ends`` (the
    end of turn and the request's stop_token_ids) are held at -inf and stop strings are not looked for;
    ``allowed``: the only tokens the answer may hold (vLLM's ``allowed_token_ids``; None: all); ``banned``: vLLM's
    ``bad_words`` as token sequences, whose last token is refused where the answer's last tokens are the rest.
    """

    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    ends: tuple[int, ...] = ()
    allowed: tuple[int, ...] | None = None
    banned: tuple[tuple[int, ...], ...] = ()

    def masks(self) -> bool:
        """Whether the options may leave a row nothing to choose (a greedy row then checks its pick)."""
        return self.allowed is not None or self.min_tokens > 0 or bool(self.banned)

    def refused(self, answer: list[int]) -> list[int]:
        """The tokens ``banned`` refuses after ``answer`` (its tokens so far): each sequence's last token where
        the answer ends with the tokens before it (a one-token word: always)."""
        return list(dict.fromkeys(words[-1] for words in self.banned
                                  if len(words) == 1 or (len(answer) >= len(words) - 1
                                                         and tuple(answer[1 - len(words):]) == words[:-1])))


OFF = RowOptions()


# A request's token history on the device (lorakit.serve.engine.Request.history, (V,) int32): this bit marks a token
# of the prompt, the bits below count the token in the answer. One row per request holds what the repetition
# penalty (prompt and answer) and the presence / frequency penalties (answer only) read, so a decode step
# penalises all its rows with a few whole-batch operations (no per-row launches, no host sync).
PROMPT_MARK = 1 << 30


def new_history(prompt: list[int], answer: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """A request's history row ``(vocab,) int32``: ``PROMPT_MARK`` on each token of ``prompt``, plus the times
    each token occurs in ``answer``."""
    history = torch.zeros(vocab, dtype=torch.int32, device=device)
    if prompt:
        history[torch.tensor(prompt, dtype=torch.long, device=device)] = PROMPT_MARK
    if answer:
        ids = torch.tensor(answer, dtype=torch.long, device=device)
        history.index_put_((ids,), torch.ones(len(answer), dtype=torch.int32, device=device), accumulate=True)
    return history


class HistoryBlock:
    """The history rows ``(k, V) int32`` (:func:`new_history`) of the k requests a decode step penalises, stacked,
    with their ``penalties (k, 3) float32`` (repetition, presence, frequency), as :func:`penalize_rows` reads them.

    The engine keeps a block from step to step while the same requests are penalised in the same order (each
    request's history is a view of its row), so a steady batch pays neither a restack nor a copy of its
    penalties; :meth:`count` adds each step's new answer tokens in one scatter."""

    def __init__(self, rows: list[torch.Tensor], penalties: list[tuple[float, float, float]]) -> None:
        self.history = torch.stack(rows)
        self.penalties = torch.tensor(penalties, dtype=torch.float32, device=self.history.device)

    def count(self, new: list[tuple[int, int]]) -> None:
        """Each ``(row, token)`` of ``new`` once more in the answer's counts (a token twice in a row: twice)."""
        if not new:
            return
        width = self.history.shape[1]
        flat = torch.tensor([row * width + token for row, token in new], dtype=torch.long, device=self.history.device)
        # scatter_add: one kernel, repeats added (index_put_'s accumulate sorts its indices first: ~10 launches)
        self.history.view(-1).scatter_add_(0, flat, torch.ones(len(new), dtype=torch.int32, device=flat.device))


def penalize_rows(logits: torch.Tensor, history: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """vLLM's ``repetition_penalty`` and OpenAI's presence / frequency penalties, on ``logits (k, V)`` float32 in
    place, each row with its own ``history (k, V) int32`` (:func:`new_history`) and ``penalties (k, 3)`` float32
    (repetition, presence, frequency; 1, 0, 0: off). In vLLM's order: a token of the prompt or the answer has its
    logit divided by the repetition penalty where positive and multiplied otherwise (CTRL's penalty, as
    transformers' RepetitionPenaltyLogitsProcessor; in float32, where a bfloat16 1.3 would be 1.296875), then a
    token the answer holds c times loses presence + frequency x c. Rows with the penalties off are unchanged
    (x / 1, x * 1 and x - 0 are exact). Returns ``logits``."""
    repetition, presence, frequency = (column.unsqueeze(1) for column in penalties.unbind(1))
    seen = history != 0
    logits.copy_(torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits))
    count = (history & (PROMPT_MARK - 1)).float()
    return logits.sub_(presence * (count > 0) + frequency * count)


def keep_only(logits: torch.Tensor, row: int, allowed: torch.Tensor) -> None:
    """vLLM's ``allowed_token_ids``, in place: every token of row ``row`` but ``allowed`` (ids (k,)) to -inf."""
    kept = logits[row, allowed]
    logits[row] = float("-inf")
    logits[row, allowed] = kept


def hold_back(logits: torch.Tensor, row: int, ends: torch.Tensor) -> None:
    """vLLM's ``min_tokens`` while the answer is shorter, in place: the end tokens ``ends`` (ids (k,)) of row
    ``row`` to -inf, so the answer cannot end yet."""
    logits[row, ends] = float("-inf")
