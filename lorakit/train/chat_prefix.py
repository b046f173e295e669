"""Where each assistant turn of a long chat is in the text of a prefix chat template, in time linear in the chat.

:func:`lorakit.train.chat_turns.chat_examples` locates assistant turn i exactly: the target starts where
``render(messages[:i], add_generation_prompt=True)`` ends and stops where ``render(messages[:i + 1])`` ends. That
is two renders of up to n messages per turn, O(n^2) for a chat of n messages: a 1,000-message chat took seconds
(a 2,000-message one 12 s with a ChatML template), each render redoing the whole chat.

For templates that render a prefix of a chat as a prefix of it (ChatML, Llama 3, Gemma, Mistral's ``[INST]``...),
the text message k adds, ``render(messages[:k + 1])[len(render(messages[:k])):]``, depends on the messages just
before it (the previous role: Qwen's tool results share one user turn) and on the start of the chat (the system
prompt; Llama 3.1 writes the tools into the first user turn; Llama 2 the system prompt into it), not on the middle.
So it is read from a short window: the leading system turns and the first turn, then ``messages[j:k]`` with j a few
messages before the text wanted, at the same parity and role as the window's first turn after the start (templates
that check alternation by ``loop.index0 % 2`` see the same roles at the same parities). Only the prefixes the exact
method renders are windowed (each target's context and the chat through it); one chain of windows with the same j
gives :data:`BLOCK` of them, each render holding :data:`CONTEXT` messages and those of its chain beyond the start.

Nothing is assumed without being checked: each window must render its shorter prefix as a prefix of it, the pieces
must add up to the whole chat exactly as rendered (character for character), each generation prompt must be
the text the whole chat has where the turn begins, and the renders of a few turns (:func:`spot_turns`) are made
exactly and must be what the windows gave. A template that rewrites earlier turns (Qwen3's ``<think>``),
numbers turns, or renders a window in any way the whole chat does not fails one of these, and the caller tries
:mod:`lorakit.train.chat_rewrites` (windows for templates that rewrite the end of the chat), then the exact renders.
Short chats (under :data:`MIN_MESSAGES`) use the exact renders directly: they are fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from lorakit.errors import LorakitError

Span = tuple[int, int]
MIN_MESSAGES = 32  # shorter chats: the exact renders (their quadratic cost is a few ms)
BLOCK = 8  # prefixes whose ends one chain of windows gives
CONTEXT = 4  # at least this many messages before a block stay in its windows
SPOTS = 3  # turns whose renders are also made exactly, spread over the chat, besides the last turn's


def spot_turns(count: int) -> list[int]:
    """The turns (indices into ``count`` targets) whose renders are also made exactly, to check what the windows
    built: :data:`SPOTS` spread over the chat, and the last. Each costs renders of up to n messages."""
    return sorted({count * s // (SPOTS + 1) for s in range(1, SPOTS + 1)} | {count - 1})


def window_start(messages: Sequence[Mapping], at_most: int, keep: int) -> int:
    """The first message after the start of a window that should begin at or before ``at_most``: at the parity and
    role of ``messages[keep]`` (the first message after the start), so that templates that check alternation by
    ``loop.index0 % 2`` see the same roles at the same parities; ``keep`` or less when the window is the whole chat."""
    anchor = messages[keep].get("role") if keep < len(messages) else None
    j = at_most - (at_most - keep) % 2
    while j > keep and messages[j].get("role") != anchor:
        j -= 2
    return j


def prefix_spans(messages: Sequence[Mapping], targets: Sequence[int], render: Callable[[list, bool], str],
                 full: str) -> list[Span] | None:
    """The target span ``(start, end)`` in ``full`` of each turn in ``targets``, as the exact renders give them for
    a prefix template; None when the chat is short or the windows do not reproduce ``full`` (then use the exact
    renders: the template may rewrite earlier turns).

    Args:
        messages: the chat as the template is given it (n messages).
        targets: indices of the assistant turns to learn, increasing, each > 0.
        render: ``render(messages, add_generation_prompt) -> str`` (raises LorakitError when the template refuses).
        full: ``render(messages, False)``, already rendered by the caller.

    Returns:
        One span per target, in characters of ``full``, or None.
    """
    n = len(messages)
    system = next((k for k, m in enumerate(messages) if m.get("role") != "system"), n)
    keep = system + 1  # the system turns and the first turn start every window
    if n < MIN_MESSAGES or not targets or targets[0] < keep or keep + 1 >= n:
        return None
    try:
        return _spans(messages, targets, render, full, keep)
    except LorakitError:  # a window the template refuses (one the whole chat never shows it): the exact renders
        return None


def _spans(messages: Sequence[Mapping], targets: Sequence[int], render: Callable[[list, bool], str], full: str,
           keep: int) -> list[Span] | None:
    """:func:`prefix_spans` past its guards. Only the prefixes the exact method renders are windowed: ``messages[:k]``
    for k = i (the context of target i) and k = i + 1 (through it). A template may write a prefix that ends inside
    a run of tool results differently (Qwen2.5 closes the user turn that holds them only after the last), which no
    target ever ends at."""
    n, wanted = len(messages), set(targets)
    start_text = render(list(messages[:keep]), False)
    if not full.startswith(start_text):
        return None
    ends = {keep: len(start_text)}  # ends[k]: where render(messages[:k]) ends in full
    starts: dict[int, int] = {}  # starts[i]: where target i's span starts (after its generation prompt)
    bounds = sorted({k for i in targets for k in (i, i + 1)} - {keep})
    base = keep  # the last prefix whose end in full is known
    for chunk in range(0, len(bounds), BLOCK):
        j = window_start(messages, base - CONTEXT, keep)

        def window(k: int, j: int = j) -> list:  # messages[:k] as the window writes it
            return list(messages[:k]) if j <= keep else list(messages[:keep]) + list(messages[j:k])

        previous = render(window(base), False)
        for k in [base] + bounds[chunk: chunk + BLOCK]:
            if k != base:
                current = render(window(k), False)
                if not current.startswith(previous):
                    return None
                piece = current[len(previous):]
                if not full.startswith(piece, ends[base]):  # the pieces must spell the whole chat, in order
                    return None
                ends[k] = ends[base] + len(piece)
                previous, base = current, k
            if k in starts or k not in wanted:
                continue
            prompted = render(window(k), True)  # the generation prompt after messages[:k], as this window writes it
            if not prompted.startswith(previous):
                return None
            prompt = prompted[len(previous):]
            if not full.startswith(prompt, ends[k]):
                return None
            starts[k] = ends[k] + len(prompt)
    if n in ends and ends[n] != len(full):
        return None
    spans = [(starts[i], ends[i + 1]) for i in targets]
    for t in spot_turns(len(targets)):  # a generation prompt is never in the whole chat: one that changes when the
        i = targets[t]  # chat is longer than a window (none we know of) shows only in the exact render
        if render(list(messages[:i]), True) != full[:spans[t][0]] or \
                (i + 1 < n and render(list(messages[:i + 1]), False) != full[:spans[t][1]]):
            return None
    return spans if all(end > start for start, end in spans) else None
