"""The renders of each assistant turn of a long chat whose template rewrites its end, in time linear in the chat.

Templates that rewrite earlier turns train a chat as one example per assistant turn
(:func:`lorakit.train.chat_turns.chat_examples`): turn i needs ``render(messages[:i], add_generation_prompt=True)``
and ``render(messages[:i + 1])``, two renders of up to n messages per turn, O(n^2) for a chat of n messages (a
2,001-message Qwen3 chat took minutes). What these templates rewrite is the END of the chat: Qwen3 writes the
``<think>`` reasoning only of the turns after the last user query (gpt-oss likewise), Mistral v0.3 writes the tool list
and the system prompt into the last user turn, DeepSeek-R1's generation prompt opens a ``<think>`` block that the turn,
once written, lacks; Hermes closes a tool result differently when it ends the chat. The text before the last user
query is written as in any longer chat.

So the renders wanted, in order (``(i, True)``, ``(i + 1, False)`` for each target i, then the whole chat), are
each the one before with an EDIT at its end: some characters removed (the reasoning now dropped, the tool list moving
to the new last user turn, the ``<think>\\n`` of a prompt), some appended. An edit is read from two renders of a
short window (the start of the chat, as :mod:`lorakit.train.chat_prefix` keeps it, then the messages since a few before
the base render, or since the last user message before it when another arrives: the text these templates rewrite),
which write the end of the chat as the whole prefix does: the characters the window's render of the longer prefix does not share with its render of the shorter
one are replaced. One chain of windows gives :data:`BLOCK` renders; each costs a render of a short chat and a copy.

Nothing is assumed without being checked, and a failed check gives None (the caller renders each prefix exactly):

- each edit removes exactly the characters the render it edits ends with;
- the last render built is the whole chat, character for character: any text an edit got wrong that no later edit
  removes (a template that numbers turns, or rewrites text further back than the windows reach) shows there;
- text that a later edit removes again (an earlier turn's reasoning, a generation prompt) is not in the whole chat:
  the two renders of a few turns spread over the chat and of the last (:func:`chat_prefix.spot_turns`) are made
  exactly, and must be what the edits built. A template that wrote such text differently in a window than in the
  whole prefix at every turn but these is not ruled out; no template we know of does (it would have to depend on
  messages far before the last user query only in text that it removes later). A template that fails a check (one
  that numbers rounds) keeps the exact renders, quadratic in the chat: only a render of each prefix says what it
  writes there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from lorakit.errors import LorakitError
from lorakit.train import chat_prefix
from lorakit.train.chat_prefix import CONTEXT, window_start

BLOCK = 8  # renders one chain of windows gives


def common_prefix_length(a: str, b: str) -> int:
    """``len(os.path.commonprefix([a, b]))``, by bisection with C-speed compares (commonprefix compares character by
    character in Python: a 40,000-character prefix took ~2 ms, for every turn of a long chat)."""
    n = min(len(a), len(b))
    if a.startswith(b[:n]):
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a.startswith(b[low:mid], low):
            low = mid
        else:
            high = mid
    return low


def rewritten_renders(messages: Sequence[Mapping], targets: Sequence[int], render: Callable[[list, bool], str],
                      full: str) -> list[tuple[str, str]] | None:
    """``(render(messages[:i], True), render(messages[:i + 1], False))`` for each turn i in ``targets``, as the exact
    renders give them, read from windows; None when the chat is short or a check fails (see the module docstring).

    Args:
        messages: the chat as the template is given it (n messages).
        targets: indices of the assistant turns to learn, increasing, each > 0.
        render: ``render(messages, add_generation_prompt) -> str`` (raises LorakitError when the template refuses).
        full: ``render(messages, False)``, already rendered by the caller.

    Returns:
        One (context with generation prompt, chat through the turn) pair of texts per target, or None.
    """
    n = len(messages)
    keep = next((k for k, m in enumerate(messages) if m.get("role") != "system"), n) + 1  # as chat_prefix's start
    short = n < chat_prefix.MIN_MESSAGES  # read at each call: one threshold for both fast paths
    if short or not targets or targets[0] < keep or keep + 1 >= n:
        return None
    wanted = [(k, prompt) for i in targets for k, prompt in ((i, True), (i + 1, False))]
    if wanted[-1] != (n, False):
        wanted.append((n, False))  # the whole chat ends the chain: the check of every edit that stays
    try:
        built = _chain(messages, wanted, render, keep)
        if built is None or built[-1] != full:
            return None
        for t in chat_prefix.spot_turns(len(targets)):  # (read here: a test replaces it)
            for s in (2 * t, 2 * t + 1):  # the turn's context (its generation prompt: never in the whole chat), and
                k, prompt = wanted[s]  # the chat through it
                if (k, prompt) != (n, False) and render(list(messages[:k]), prompt) != built[s]:
                    return None
    except LorakitError:  # a window the template refuses (one the whole chat never shows it): the exact renders
        return None
    return [(built[2 * t], built[2 * t + 1]) for t in range(len(targets))]


def _chain(messages: Sequence[Mapping], wanted: list[tuple[int, bool]], render: Callable[[list, bool], str],
           keep: int) -> list[str] | None:
    """The render of each prefix in ``wanted`` (``(k, add_generation_prompt)``, k non-decreasing), the first exact,
    each next one the one before edited as a window's renders of the two are (see the module docstring)."""
    k, prompt = wanted[0]
    current = render(list(messages[:k]), prompt)
    built = [current]
    users = [u for u, m in enumerate(messages) if m.get("role") == "user"]
    last_user, u = -1, 0  # the last user message before the base render's end
    for chunk in range(1, len(wanted), BLOCK):
        base, base_prompt = wanted[chunk - 1]
        while u < len(users) and users[u] < base:
            last_user, u = users[u], u + 1
        at_most = base - CONTEXT
        if u < len(users) and users[u] < wanted[min(chunk + BLOCK, len(wanted)) - 1][0]:
            # a user message arrives within the chunk: what a template rewrites then starts at the last one before it
            # (Qwen3 drops the reasoning written since, Mistral moves the tools from it), so the windows hold that one,
            # or are the whole prefix when it is the start's; once per user message, so linear still
            at_most = min(at_most, max(last_user, keep))
        j = window_start(messages, at_most, keep)

        def window(k: int, j: int = j) -> list:  # messages[:k] as the window writes it
            return list(messages[:k]) if j <= keep else list(messages[:keep]) + list(messages[j:k])

        previous = render(window(base), base_prompt)
        for k, prompt in wanted[chunk: chunk + BLOCK]:
            text = render(window(k), prompt)
            same = common_prefix_length(previous, text)
            removed = len(previous) - same
            if not current.endswith(previous[same:]) or removed >= len(current):
                return None
            current = current[:len(current) - removed] + text[same:]
            built.append(current)
            previous = text
    return built
