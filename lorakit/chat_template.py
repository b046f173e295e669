"""What a tokenizer's chat template writes at the end of an assistant turn, found by rendering it.

Shared by training (each supervised turn ends with that token) and generation (a row stops on it). It lives
outside ``lorakit.train`` so generation and serving can use it without importing the training code.
"""

from __future__ import annotations

import re
from typing import Any

_PROBE_ANSWER = "Sure."
_PROBE_QUESTION = "Hi"
# markup that chat templates write as one special token each: ChatML's <|im_start|>, Llama 3's <|eot_id|>, Phi's
# <|end|>, Gemma's <start_of_turn>
_MARKUP = re.compile(r"<\|[^<>|\s]{1,48}\|>|<(?:start|end)_of_turn>")


def template_end_of_turn(tokenizer: Any) -> int | None:
    """The first special (added) token the chat template writes after an assistant's words, or None.

    Found by rendering a one-turn chat with and without its answer: what follows the answer is the template's end
    of turn (``<|im_end|>\\n``, ``<end_of_turn>\\n``, ``<|eot_id|>``, ``</s>``, or any token a custom template
    uses). None without a template, or when the template refuses the probe chats or writes no special token there.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = _probe(tokenizer)
    return None if probe is None else _first_special_after_answer(tokenizer, *probe)


def _probe(tokenizer: Any) -> tuple[str, str] | None:
    """A one-turn chat as the template writes it up to the generation prompt, and through the answer; None when the
    template refuses both probe chats."""
    for opening in ([], [{"role": "system", "content": "Be brief."}]):  # some templates want a system turn first
        try:
            before = tokenizer.apply_chat_template(opening + [{"role": "user", "content": _PROBE_QUESTION}],
                                                   tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(opening + [{"role": "user", "content": _PROBE_QUESTION},
                                                               {"role": "assistant", "content": _PROBE_ANSWER}],
                                                    tokenize=False)
        except Exception:  # a template that refuses this chat (jinja raise_exception): try the next opening
            continue
        return before, through
    return None


def markup_not_in_vocabulary(tokenizer: Any) -> list[str]:
    """The special-token markup the chat template writes (``<|im_start|>``, ``<|im_end|>``, ``<start_of_turn>``) that
    is not one token of this tokenizer, in the order written, when the turn's end is such markup; else [].

    A ChatML template put on a base model without ChatML's tokens (Mistral's, Llama 2's) writes ``<|im_end|>`` as
    plain text: its pieces train as any text, the model learns to write the markup as characters, and the turn has
    no end-of-turn token (:func:`template_end_of_turn` is None). Templates whose role markup is text by design
    (Zephyr's ``<|user|>`` on Mistral's tokenizer) end the turn with a special token (``</s>``): not reported."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = _probe(tokenizer)
    if probe is None or not all(isinstance(text, str) for text in probe) or _PROBE_ANSWER not in probe[1]:
        return []
    if _first_special_after_answer(tokenizer, *probe) is not None:
        return []

    def missing(text: str) -> list[str]:
        return [mark for mark in dict.fromkeys(_MARKUP.findall(text))
                if len(tokenizer(mark, add_special_tokens=False)["input_ids"]) != 1]

    return missing(probe[1]) if missing(probe[1].split(_PROBE_ANSWER, 1)[1]) else []


def _first_special_after_answer(tokenizer: Any, before: Any, through: Any) -> int | None:
    if not isinstance(before, str) or not isinstance(through, str) or not through.startswith(before):
        return None
    turn = through[len(before):]
    if _PROBE_ANSWER not in turn:
        return None
    tail = turn.split(_PROBE_ANSWER, 1)[1]
    special = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})} | set(tokenizer.all_special_ids)
    return next((t for t in tokenizer(tail, add_special_tokens=False)["input_ids"] if t in special), None)
