"""What an adapter folder brings besides the adapter, for the commands that load one (merge, generate, eval).

transformers' Trainer and trl save the tokenizer beside the adapter (and with it a changed chat template, added
tokens); peft saves the embedding and head whole when the vocabulary was resized for such tokens. A command that
loads the adapter uses both: the base resized to the saved rows, and the folder's tokenizer instead of the base's.
"""

from __future__ import annotations


def adapter_tokenizer(folder: str, model):
    """The tokenizer saved in the adapter folder (transformers' Trainer and trl save it beside the adapter; peft's
    docs say to when tokens or the chat template change), or None. The model was trained with it, so it is used,
    not the base's; one that names more tokens than the model has embeddings for is refused."""
    from pathlib import Path

    from lorakit.errors import LorakitError
    from lorakit.models.loading import TOKENIZER_FILES, load_tokenizer

    path = Path(folder).expanduser()
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    tokenizer = load_tokenizer(path)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise LorakitError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model's embedding only {rows} "
                           "rows; use the base the adapter was trained on (its resized vocabulary), or remove "
                           f"the tokenizer files from {folder} to keep the base's tokenizer")
    print(f"tokenizer and chat template: from {folder} (the adapter folder has its own), not from the base")
    return tokenizer


def resize_for(model, adapter_file, folder: str) -> None:
    """Resize the base for an adapter trained on a resized vocabulary (lorakit.resized_vocab), saying so; before
    ``load_adapter``, which would do the same with a warning instead of these lines."""
    from lorakit.resized_vocab import take_resized_vocabulary

    resized = take_resized_vocabulary(model, adapter_file)
    for line in resized.lines(folder) if resized else []:
        print(line)
