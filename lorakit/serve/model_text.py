"""The text side of a served model: what a request's prompt is rendered and encoded with, and its answer decoded with.

The base has one; so has each adapter whose folder holds a tokenizer (transformers' Trainer and trl save one beside
the adapter, often with another chat template: an adapter trained on ChatML answers ChatML prompts). The adapter
pool hands a request the text side of the adapter it names (``AdapterPool.text_of``; the base's otherwise), and
everything that turns text into ids or ids into text for that request goes through it: the chat template, the
end-of-turn tokens that stop a row, the reasoning block's markers, the tool-call format the template writes, the
logprobs' token strings.

The ids mean the same rows of the one shared model whichever text side made them: an adapter's tokenizer is
admitted only when it gives the base's tokens the base's ids (``lorakit.serve.adapter_tokenizer``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from lorakit.serve.reasoning import ReasoningParser, select_parser


@dataclass(eq=False)
class ModelText:
    """A tokenizer and what its chat template implies.

    ``stop_token_ids``: the ids that end an answer (``generation.end_of_turn_ids``: EOS, the template's end of
    turn, the model's generation_config); ``reasoning``: the reasoning block's parser for this template (None: not
    split); ``rows``: the model's embedding rows (no id past them may reach the engine); ``adapter``: the adapter
    whose folder the tokenizer came from (None: the base's); ``lock``: held while the tokenizer runs (a fast
    tokenizer is not safe to use from two threads at once, "Already borrowed").
    """

    tokenizer: Any
    stop_token_ids: tuple[int, ...]
    reasoning: ReasoningParser | None
    rows: int
    adapter: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _vocab: dict | None = field(default=None, repr=False)

    @classmethod
    def build(cls, tokenizer: Any, model: Any, reasoning_choice: str = "auto",
              adapter: str | None = None) -> "ModelText":
        """The text side of ``tokenizer`` on ``model``; ``reasoning_choice``: ``--reasoning-parser``'s value."""
        from lorakit.generation import end_of_turn_ids

        return cls(tokenizer, end_of_turn_ids(tokenizer, model), select_parser(tokenizer, reasoning_choice),
                   embedding_rows(model, tokenizer), adapter)

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: known to the tokenizer and inside the embedding table (an id past it would
        fail the whole engine batch, other clients' rows included)."""
        return min(len(self.tokenizer), self.rows)

    def vocab(self) -> dict[str, int]:
        """``tokenizer.get_vocab()``, read once (what adapters' tokenizers are compared with)."""
        if self._vocab is None:
            with self.lock:
                self._vocab = dict(self.tokenizer.get_vocab())
        return self._vocab

    def encode(self, prompt, chat: bool, template_kwargs: dict | None = None) -> list[int]:
        """``generation.encode_prompt`` with this tokenizer: a string, or chat messages through its template,
        which renders under ``template_guard``'s deadline (``TemplateTooSlow`` past it)."""
        from lorakit.generation import encode_prompt

        with self.lock:
            if not chat:  # plain text: no template runs
                return encode_prompt(self.tokenizer, prompt, chat=False)
            return self.rendering(lambda: encode_prompt(self.tokenizer, prompt, chat=True,
                                                        chat_template_kwargs=template_kwargs))

    @staticmethod
    def rendering(render):
        """``render()`` (which runs the chat template, Jinja code from an adapter's folder or a request) under
        ``template_guard.RENDER_TIMEOUT_S``; the caller holds ``lock``, which a stuck render would hold for good."""
        from lorakit.serve.template_guard import with_deadline

        return with_deadline(render)

    def template_past_rows(self) -> str | None:
        """Why every chat request will be refused, or None: the chat template writes markup tokens past the
        model's embedding rows (a tokenizer that gained them without the model being resized), said once at
        startup rather than as each chat's 400."""
        from lorakit.generation import has_chat_template

        if len(self.tokenizer) <= self.rows or not has_chat_template(self.tokenizer):
            return None
        try:
            ids = self.encode([{"role": "user", "content": "hi"}], True)
        except Exception:  # noqa: BLE001 (a template that wants more than one user turn: each request says its own)
            return None
        past = [token for token in ids if token >= self.rows]
        if not past:
            return None
        with self.lock:
            token = self.tokenizer.convert_ids_to_tokens(past[0])
        return (f"the chat template writes the token {token!r} (id {past[0]}), past the model's {self.rows:,} "
                f"embedding rows (the tokenizer has {len(self.tokenizer):,} tokens: added without resizing the "
                "model), so every chat request will be refused; resize the model once "
                "(model.resize_token_embeddings(len(tokenizer)), then save_pretrained)")

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` continuing a prompt (no BOS; a template's special tokens read as themselves)."""
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int) -> list[int]:
        """OpenAI's logprobs ``bytes`` of one token (``text.token_bytes``)."""
        from lorakit.serve.text import token_bytes

        with self.lock:
            return list(token_bytes(self.tokenizer, token))


def embedding_rows(model: Any, tokenizer: Any) -> int:
    """The model's input embedding rows (the tokenizer's length where the model has no embedding to ask)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.shape[0] if embeddings is not None else len(tokenizer)
