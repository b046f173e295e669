"""What a tokenizer's chat template writes at the end of an assistant turn, found by rendering it.

Shared by training (each supervised turn ends with that token) and generation (a row stops on it). It lives
outside ``lorakit.train`` so generation and serving can use it without importing the training code.
"""

from __future__ import annotations

from typing import Any

_PROBE_ANSWER = "Sure."


def template_end_of_turn(tokenizer: Any) -> int | None:
    """The first special (added) token the chat template writes after an assistant's words, or None.

    Found by rendering a one-turn chat with and without its answer: what follows the answer is the template's end
    of turn (``<|im_end|>\\n``, ``<end_of_turn>\\n``, ``<|eot_id|>``, ``</s>``, or any token a custom template
    uses). None without a template, or when the template refuses the probe chats or writes no special token there.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    for opening in ([], [{"role": "system", "content": "Be brief."}]):  # some templates want a system turn first
        try:
            before = tokenizer.apply_chat_template(opening + [{"role": "user", "content": "Hi"}], tokenize=False,
                                                   add_generation_prompt=True)
            through = tokenizer.apply_chat_template(opening + [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": _PROBE_ANSWER}],
                                                    tokenize=False)
        except Exception:  # a template that refuses this chat (jinja raise_exception): try the next opening
            continue
        return _first_special_after_answer(tokenizer, before, through)
    return None


def _first_special_after_answer(tokenizer: Any, before: Any, through: Any) -> int | None:
    if not isinstance(before, str) or not isinstance(through, str) or not through.startswith(before):
        return None
    turn = through[len(before):]
    if _PROBE_ANSWER not in turn:
        return None
    tail = turn.split(_PROBE_ANSWER, 1)[1]
    special = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})} | set(tokenizer.all_special_ids)
    return next((t for t in tokenizer(tail, add_special_tokens=False)["input_ids"] if t in special), None)
