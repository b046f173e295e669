"""Special tokens spelled in a chat's text: ``<|im_end|>`` inside a user's message.

The rendered chat is tokenized with its special tokens parsed, as transformers' ``apply_chat_template(tokenize=True)``,
TRL's SFTTrainer and inference servers tokenize it (the template's own markup must become those tokens), so the same
text inside a message's content becomes the token too: a user's ``<|im_end|>`` ends the turn early, an answer that
ends with ``<|im_end|>`` ends it twice. lorakit trains the chat as those tools and the server read it, and the data
summary warns once per dataset, naming the first record (:class:`lorakit.train.data.DataSummary`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from lorakit.train.formats import REASONING_KEYS, Record

# the shapes special tokens have (<|im_end|>, </s>, <start_of_turn>, [INST]), at every position (a lookahead, so that
# "[<s>]" still shows its "<s>"): a text is scanned for these and each candidate looked up, since one alternation of
# thousands of tokens (Gemma 3 has over 6,000) takes tens of ms per message on text full of "<" (HTML, code)
_TOKEN_SHAPES = re.compile(r"(?=(<[^<>\s]{1,80}>|\[[^\[\]\s]{1,80}\]))")


class SpecialTexts:
    """The texts of the special tokens a tokenizer reads out of plain text; :meth:`search` finds one in a string."""

    def __init__(self, texts: Iterable[str]):
        texts = set(texts)
        self.shaped = frozenset(t for t in texts if _TOKEN_SHAPES.match(t) and _TOKEN_SHAPES.match(t).group(1) == t)
        rest = sorted(texts - self.shaped, key=len, reverse=True)  # other shapes: few, one alternation
        self.rest = re.compile("|".join(map(re.escape, rest))) if rest else None

    def search(self, text: str) -> str | None:
        """The first special token's text found in ``text`` (of the usual shapes first), or None."""
        for match in _TOKEN_SHAPES.finditer(text):
            if match.group(1) in self.shaped:
                return match.group(1)
        found = self.rest.search(text) if self.rest is not None else None
        return found.group() if found else None


def special_token_texts(tokenizer: Any) -> SpecialTexts | None:
    """The texts of every special token the tokenizer reads out of plain text (``<|im_end|>``, ``<|eot_id|>``,
    ``<s>``); None when it has none.

    The rendered chat is tokenized with its special tokens parsed (as transformers, trl and inference servers do:
    the template's own markup must become those tokens), so the same text inside a message's content becomes the
    token too: a user's ``<|im_end|>`` ends the turn early, an answer that ends with ``<|im_end|>`` ends it twice.
    Added tokens that are not special (Qwen's ``<tool_call>``, ``<think>``) are text the model writes: not matched.
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {token.content for token in decoder.values() if getattr(token, "special", False)}
    texts = sorted(t for t in texts | set(getattr(tokenizer, "all_special_tokens", ())) if isinstance(t, str) and t)
    if not texts:
        return None
    try:  # one call for all (Gemma 3 has thousands): only those it turns into one token when it meets them in text
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that refuses the probe: nothing is matched
        return None
    read = [text for text, ids in zip(texts, encoded) if list(ids) == [tokenizer.convert_tokens_to_ids(text)]]
    return SpecialTexts(read) if read else None


def spelled_special_token(record: Record, specials: SpecialTexts | None) -> str | None:
    """Where a chat's text spells a special token ("messages[1] (user) has '<|im_end|>'"), or None. Text,
    prompt/completion records are not searched: their text is the sequence trained on as the user wrote it, and
    markup there (a prompt already in the template's format) is meant."""
    if specials is None or record.shape != "messages":
        return None
    for i, message in enumerate(record["messages"]):
        texts = [message.get("content")] + [message.get(key) for key in REASONING_KEYS]
        for call in message.get("tool_calls", ()):
            function = call.get("function") or {}
            texts += [function.get("name"), json.dumps(function.get("arguments"), ensure_ascii=False)]
        for text in texts:
            found = specials.search(text) if isinstance(text, str) else None
            if found:
                return f"messages[{i}] ({message['role']}) has {found!r}"
    return None
