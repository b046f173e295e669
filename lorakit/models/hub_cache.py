"""Model folders in the local Hugging Face cache: ``models--org--name/snapshots/<commit>/``, filled by ``hf download``.

lorakit downloads nothing; an ``org/name`` id that is not a local folder is read from the cache when it is there
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), as transformers' offline mode does.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_snapshot(folder: Path, holding: str | None = "config.json") -> Path | None:
    """The snapshot folder of a Hugging Face cache entry (``models--org--name`` or ``datasets--org--name``, whose
    ``snapshots/<commit>`` holds the files): the one ``refs/main`` names, else the newest; only snapshots holding the
    file ``holding`` count (None: any folder). None for any other folder."""
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None

    def fits(snapshot: Path) -> bool:
        return (snapshot / holding).is_file() if holding else snapshot.is_dir()

    try:
        main = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        main = ""
    if main and fits(snapshots / main):
        return snapshots / main
    found = [p for p in snapshots.iterdir() if fits(p)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def local_model_folder(model: str) -> Path:
    """The folder ``model`` names before any check: the path itself (``~`` expanded), or the Hugging Face cache's
    snapshot when it is an ``org/name`` id that is not a local folder but was downloaded with ``hf download``."""
    folder = Path(os.path.expanduser(str(model)))
    if not folder.is_dir() and looks_like_hub_id(str(model)):
        return hub_cache_snapshot(str(model)) or folder
    return folder


def hub_cache_root() -> Path:
    """Where ``hf download`` keeps models: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub
    (huggingface_hub reads the variables when it is imported)."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:  # transformers needs huggingface_hub, so only a broken install lands here
        return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def hub_cache_snapshot(repo_id: str, holding: str = "config.json") -> Path | None:
    """The snapshot of ``org/name`` in the local Hugging Face cache (the one ``refs/main`` names, else the newest
    holding ``holding``: a model's config.json, an adapter's adapter_config.json), or None. Nothing is fetched: this
    is the folder ``hf download org/name`` filled."""
    entry = hub_cache_root() / ("models--" + repo_id.replace("/", "--"))
    try:
        return cache_snapshot(entry, holding) if entry.is_dir() else None
    except OSError:  # an unreadable cache: said as not found
        return None


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` (one slash, no leading ./ ~ or /): what people copy from the Hugging Face Hub."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and " " not in text
