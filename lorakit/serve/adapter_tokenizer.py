"""An adapter folder's own tokenizer, read for the server as warily as its weights.

transformers' Trainer and trl save the tokenizer beside the adapter, often with the chat template it was trained
on. The server renders the adapter's chats with it (``model_text.ModelText``) when it agrees with the base on what
every token id means; otherwise the adapter is refused in one line at load, saying what differs:

- more tokens than the base's embedding rows (a vocabulary resized for new tokens: the server never resizes the
  base every request shares), or an added token past them;
- a base token with another id, or missing: its prompts would mean other tokens to this model.

Tokens the adapter's tokenizer adds in rows the base has but its tokenizer leaves unused (Qwen's and Phi's padded
embeddings) are fine: the ids of the base's own tokens are unchanged. A tokenizer that is the base's unchanged (what
the Trainer saves when neither tokens nor template changed: the common case) serves as the base's text side itself,
so adapters share it (its memory, and llguidance's view of it for structured outputs, ~1 s to build).

An adapter without a tokenizer of its own, on a base whose tokenizer has no chat template, whose ``lorakit train``
run trained Alpaca or question/answer records in their prompt format ("### Instruction: ... ### Response:", the
run's results.json says so) is served with a copy of the base's tokenizer given a chat template in that format
(``lorakit.train.formats.frame_chat_template``): its chat requests are rendered as its training prompts were, token
for token, instead of refused for want of a template.

The folder is as hostile as its weights (``lorakit.serve.pool``): the known tokenizer files only, each opened
without following a symbolic link (relative to the folder's descriptor, so none can be swapped in), regular files
under ``MAX_FILE_BYTES`` (``MAX_TOTAL_BYTES`` together), copied into a private temporary folder that transformers
then reads (it would follow links, and read any file the folder holds); never the folder's Python code
(``models.loading.load_tokenizer``: ``trust_remote_code=False``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.serve.model_text import ModelText

# what transformers reads of a tokenizer folder (fast and slow tokenizers, templates, added tokens)
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
         "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
         "spiece.model", "sentencepiece.bpe.model")
TEMPLATES_FOLDER = "additional_chat_templates"  # transformers 5: one named template per .jinja file
MAX_TEMPLATES = 32
MAX_FILE_BYTES = 64 << 20  # Gemma 3's tokenizer.json, the largest in common use, is 33 MB
MAX_TOTAL_BYTES = 128 << 20
RESULTS_NAME = "results.json"  # a lorakit train run's, beside its adapter/: the prompt format of its records


def has_tokenizer(folder: Path) -> bool:
    """Whether the adapter folder holds a tokenizer of its own (what ``lorakit generate --adapter`` takes)."""
    from lorakit.models.loading import TOKENIZER_FILES

    return any(os.path.lexists(folder / name) for name in TOKENIZER_FILES)


def renders_own_chats(folder: Path, base_tokenizer: Any) -> bool:
    """Whether adapter folder ``folder``'s chats are rendered by its own text side, not the base's (/v1/models'
    ``"tokenizer": "adapter"``): it holds a tokenizer, or (on a base without a chat template) it was trained by a
    run in a prompt format that :func:`adapter_text` gives it (a run from before adapters carried that tokenizer)."""
    if has_tokenizer(folder):
        return True
    return not getattr(base_tokenizer, "chat_template", None) and run_prompt_frame(folder) is not None


def adapter_text(folder: Path, name: str, base: ModelText, model: Any, reasoning_choice: str = "auto"
                 ) -> ModelText | None:
    """The text side of adapter ``name`` (folder ``folder``) on ``model``: None when its folder holds no tokenizer
    (the base's serves it), ``base`` itself when it holds the base's unchanged; raises ``LorakitError`` (one line,
    saying what is wrong with "its tokenizer": the caller names the adapter) for a tokenizer that is unsafe, broken,
    or means other tokens than ``base``'s."""
    if not has_tokenizer(folder):
        frame = None if getattr(base.tokenizer, "chat_template", None) else run_prompt_frame(folder)
        return None if frame is None else _framed_text(base, model, frame, name, reasoning_choice)
    with tempfile.TemporaryDirectory(prefix="lorakit-tokenizer-") as private:
        _copy_files(folder, Path(private))
        tokenizer = _load(Path(private))
    own = check_vocabulary(tokenizer, base)
    if own == base.vocab():
        with base.lock:  # requests use the base's tokenizer meanwhile (a fast one is not safe from two threads)
            same = same_tokenizer(tokenizer, base.tokenizer)
        if same:
            return base
    _check_template(tokenizer)
    return ModelText.build(tokenizer, model, reasoning_choice, adapter=name)


def run_prompt_frame(folder: Path) -> tuple[str, str | None] | None:
    """The prompt format (kind, system text) the ``lorakit train`` run holding adapter folder ``folder`` (RUN/adapter,
    RUN/best, RUN/checkpoints/step-N/adapter) trained its Alpaca or question/answer records in on a tokenizer without
    a chat template (its results.json's prompt_format and system_prompt, as ``lorakit generate --adapter`` reads
    them), or None: no such run, another format, or a file that cannot be read (no link followed, under
    ``MAX_FILE_BYTES``)."""
    import json

    from lorakit.train.eval_cli import run_candidates
    from lorakit.train.formats import PROMPT_FRAMES

    for run in run_candidates(folder):
        path = run / RESULTS_NAME
        if not os.path.lexists(path):
            continue
        try:
            raw = _read_warily(path)
            if raw is None:
                return None
            results = json.loads(raw.decode("utf-8"))
        except (LorakitError, OSError, ValueError):
            return None
        kind, system = (results.get("prompt_format"), results.get("system_prompt")) if isinstance(results, dict) \
            else (None, None)
        return (kind, system) if kind in PROMPT_FRAMES and isinstance(system, (str, type(None))) else None
    return None


def _read_warily(path: Path) -> bytes | None:
    """The bytes of file ``path``, opened without following a link (LorakitError / OSError if it cannot be), or None
    when it is over ``MAX_FILE_BYTES``."""
    from lorakit.io import _open, _read_exactly

    fd = _open(path, False, None)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(fd).st_size
        return None if size > MAX_FILE_BYTES else _read_exactly(path, handle, size)


def _framed_text(base: ModelText, model: Any, frame: tuple[str, str | None], name: str, reasoning_choice: str
                 ) -> ModelText:
    """The base's tokenizer (a copy) with a chat template in the run's prompt format (``frame``:
    :func:`run_prompt_frame`; ``lorakit.train.formats.frame_chat_template``), so that adapter ``name``'s chat
    requests are rendered as its training prompts were, token for token, not refused for want of a template."""
    import copy

    from lorakit.train.formats import with_frame_template

    with base.lock:  # requests use the base's tokenizer meanwhile
        tokenizer = copy.deepcopy(base.tokenizer)
    return ModelText.build(with_frame_template(tokenizer, *frame), model, reasoning_choice, adapter=name)


def own_template(folder: Path, base_template: Any) -> bool:
    """Whether the adapter folder brings a chat template other than the base's (``base_template``): a
    chat_template.jinja / .json, named templates, or tokenizer_config.json's ``chat_template``, read as warily as
    at load (no link followed, under ``MAX_FILE_BYTES``). A file that cannot be read says no: the load says why."""
    import json

    base = base_template if isinstance(base_template, str) else None
    if os.path.lexists(folder / TEMPLATES_FOLDER):
        return True
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not os.path.lexists(path):
            continue
        try:
            raw = _read_warily(path)
            if raw is None:
                return False
            data = raw.decode("utf-8", "replace")
            template = data if name.endswith(".jinja") else json.loads(data).get("chat_template")
        except (LorakitError, OSError, ValueError, AttributeError):
            return False
        if template:
            return template != base
    # no tokenizer of its own: the prompt format of its run, which a base without a template is given (_framed_text)
    return base is None and not has_tokenizer(folder) and run_prompt_frame(folder) is not None


def same_tokenizer(tokenizer: Any, other: Any) -> bool:
    """Whether two fast tokenizers of one vocabulary encode, decode and render alike: the same class, chat
    template(s), special tokens, added tokens (and whether each is special), and backend (normalizer,
    pre-tokenizer, merges, post-processor: ``to_str``). Slow tokenizers are never taken for the same."""
    if type(tokenizer) is not type(other) or tokenizer.chat_template != other.chat_template:
        return False
    if tokenizer.special_tokens_map != other.special_tokens_map:
        return False
    added = [{i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()} for tok in (tokenizer, other)]
    backends = [getattr(tok, "backend_tokenizer", None) for tok in (tokenizer, other)]
    return added[0] == added[1] and None not in backends and backends[0].to_str() == backends[1].to_str()


def _copy_files(folder: Path, into: Path) -> None:
    """The known tokenizer files of ``folder`` into ``into``: see the module docstring."""
    from lorakit.io import _open, _read_exactly

    total = 0

    def copy(source: Path, target: Path, folder_fd: int) -> None:
        nonlocal total
        fd = _open(source, False, folder_fd)  # O_NOFOLLOW; a FIFO or folder swapped in is "not a regular file"
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(fd).st_size
            if size > MAX_FILE_BYTES:
                raise LorakitError(f"{source.name} is {size:,} bytes, over the limit of {MAX_FILE_BYTES:,} for a "
                                   "tokenizer file")
            total += size
            if total > MAX_TOTAL_BYTES:
                raise LorakitError(f"its tokenizer files are over {MAX_TOTAL_BYTES:,} bytes together")
            target.write_bytes(_read_exactly(source, handle, size))

    folder_fd = _open(folder, False, None, directory=True)
    try:
        for name in FILES:
            if os.path.lexists(folder / name):
                copy(folder / name, into / name, folder_fd)
        templates = folder / TEMPLATES_FOLDER
        if os.path.lexists(templates):
            templates_fd = _open(templates, False, folder_fd, directory=True)
            try:
                names = sorted(n for n in os.listdir(templates_fd) if n.endswith(".jinja"))
                if len(names) > MAX_TEMPLATES:
                    raise LorakitError(f"{TEMPLATES_FOLDER} holds {len(names)} templates, over the limit of "
                                       f"{MAX_TEMPLATES}")
                (into / TEMPLATES_FOLDER).mkdir()
                for name in names:
                    copy(templates / name, into / TEMPLATES_FOLDER / name, templates_fd)
            finally:
                os.close(templates_fd)
    finally:
        os.close(folder_fd)


def _load(private: Path):
    """The tokenizer of the copied files; its errors (which name the private folder) as the adapter's."""
    from lorakit.models.loading import load_tokenizer

    try:
        return load_tokenizer(private)
    except LorakitError as error:
        raise LorakitError(str(error).replace(f"{private}{os.sep}", "").replace(str(private), "its folder")) from None
    except (RecursionError, ValueError, OSError) as error:  # what load_tokenizer does not turn into one line
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise LorakitError(f"cannot load its tokenizer: {reason.replace(str(private), 'its folder')}") from None


def check_vocabulary(tokenizer: Any, base: ModelText) -> dict[str, int]:
    """Refuse a tokenizer whose ids mean other rows of the shared model than the base's (module docstring);
    returns its vocabulary."""
    own = tokenizer.get_vocab()
    fix = ("serve it with the base it was trained on, or delete the tokenizer files from its folder to render its "
           "chats with the base's tokenizer")
    past = sorted((i, t) for t, i in own.items() if i >= base.rows)
    if len(tokenizer) > base.rows or past:
        example = f" ({past[0][1]!r} is id {past[0][0]})" if past else ""
        raise LorakitError(f"its tokenizer has {len(tokenizer):,} tokens{example}, more than this base's "
                           f"{base.rows:,} embedding rows: it was trained on a vocabulary resized for new tokens, and "
                           f"the server never resizes the base all requests share; merge it into a resized base "
                           f"(lorakit merge) and serve that, or {fix}")
    base_vocab = base.vocab()
    moved = [(t, i) for t, i in base_vocab.items() if own.get(t) != i]
    if moved:
        token, base_id = min(moved, key=lambda pair: pair[1])
        said = f"{token!r} is id {base_id} in the base, " + (f"{own[token]} in its tokenizer" if token in own
                                                              else "absent from its tokenizer")
        raise LorakitError(f"its tokenizer gives {len(moved):,} of the base's {len(base_vocab):,} tokens other ids "
                           f"({said}): its prompts would mean other tokens to this model; {fix}")
    return own


def _check_template(tokenizer: Any) -> None:
    """A chat template that is not valid Jinja, or that takes too long (or too much memory) to render a sample chat
    (``template_guard.check_template``, in a child process), is refused at load, not in every request's 400."""
    if not getattr(tokenizer, "chat_template", None):
        return
    from lorakit.serve.template_guard import check_template

    check_template(tokenizer.chat_template)
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template may refuse this chat (a required system turn): that is no syntax error
        if type(error).__name__ == "TemplateSyntaxError":
            raise LorakitError(f"its chat template is not valid Jinja (line {getattr(error, 'lineno', '?')}: "
                               f"{getattr(error, 'message', None) or error}); fix chat_template.jinja (or "
                               "tokenizer_config.json's chat_template) in its folder") from None
