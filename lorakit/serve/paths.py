"""Adapter names -> folders, strictly inside the adapters folder.

A name comes from an HTTP client, so it is hostile until proven otherwise. It must be a plain folder name
(letters, digits, ``.``, ``_``, ``-``; no ``..``, no separators, no ``%``, no NUL, at most 128 characters), and the
folder, after resolving every symlink, must be a direct child of the adapters folder. The files an adapter is
read from must also resolve inside that folder, so a symlinked ``adapter_model.safetensors`` pointing at
``/etc/shadow`` is refused before anything is opened.

A name may also be *registered* to a folder of its own (vLLM's ``POST /v1/load_lora_adapter``, ``lora_path``): a
folder inside the adapters folder at any depth, or anywhere the server can read where its operator allowed that
(``--allow-any-lora-path``). Such a folder's files must resolve inside that folder (:func:`resolve_registered`).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# NAME_PATTERN (and no "..") in words, the whole rule: a name of allowed characters only (".hidden", "_draft",
# "a..b", 129 characters) was told to use "letters, digits, '.', '_', '-'", which it did
NAME_RULE = "a name is 1 to 128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"


class UnsafeNameError(LorakitError):
    """The adapter name tries to leave the adapters folder (or is not a plain folder name)."""


class UnknownAdapterError(LorakitError):
    """No adapter folder of that name."""


def check_name(name: object) -> str:
    """The name itself, if it is a plain folder name; raises ``UnsafeNameError`` otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = repr(name)[:80]
        raise UnsafeNameError(f"adapter name {shown} is not allowed: {NAME_RULE} (a folder of the adapters folder; "
                              "no paths)")
    return name


def closest(name: object, names: list[str]) -> str | None:
    """The one of ``names`` a client most likely meant by ``name``, or None when none is close: the same but for
    case, the last part of a path or Hugging Face id (``org/model``, ``../x``, URL-encoded too), or the nearest
    spelling. Cheap for any ``name`` (a megabyte of one): it runs on the server's event loop."""
    from urllib.parse import unquote

    if not isinstance(name, str) or not names:
        return None
    # a served name has at most 128 characters: the whole name is compared by its first 129, its last part (what
    # follows the last slash, "..%2Fx" read as "../x") by the end of the name
    tail = unquote(name[-1024:]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1][:129]
    lowered = {n.lower(): n for n in reversed(names)}
    for key in (name[:129].lower(), tail.lower()):
        if key in lowered:
            return lowered[key]
    # separators a client mixes up ("support_v2" for "support-v2") count as no difference
    fold = {re.sub(r"[-_. ]", "", n.lower()): n for n in reversed(names)}
    key = re.sub(r"[-_. ]", "", tail.lower())
    if key in fold:
        return fold[key]
    near = difflib.get_close_matches(key, list(fold), n=1, cutoff=0.75)
    return fold[near[0]] if near else None


def _inside(root: Path, path: Path) -> bool:
    return os.path.commonpath([str(root), str(path)]) == str(root) and path != root


def resolve_adapter(root: str | os.PathLike, name: object) -> Path:
    """The real folder of adapter ``name`` under ``root``; every file it holds that lorakit reads stays inside."""
    name = check_name(name)
    real_root = Path(os.path.realpath(root))
    candidate = real_root / name
    real = Path(os.path.realpath(candidate))
    if not _inside(real_root, real):
        raise UnsafeNameError(f"adapter {name!r} is a link that leaves the adapters folder; refused")
    if not real.is_dir():
        raise UnknownAdapterError(f"no adapter named {name!r} in the adapters folder")
    _files_stay_inside(real, real_root, name, "the adapters folder")
    return real


def _files_stay_inside(folder: Path, root: Path, name: str, what: str) -> None:
    """Refuses adapter ``name`` when the config or weights file in ``folder`` is a link that resolves outside
    ``root`` (``what`` names it in the message)."""
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        file_path = folder / file_name
        if os.path.lexists(file_path) and not _inside(root, Path(os.path.realpath(file_path))):
            raise UnsafeNameError(f"adapter {name!r}: {file_name} is a link that leaves {what}; refused")


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` (every link resolved) lies inside folder ``root`` (resolved too), ``root`` itself excluded."""
    return _inside(Path(os.path.realpath(root)), Path(os.path.realpath(path)))


def resolve_registered(folder: str | os.PathLike, name: str) -> Path:
    """The real folder registered to adapter ``name``; the files lorakit reads from it must resolve inside it (a
    link to another place is refused, as in the adapters folder). Raises ``UnknownAdapterError`` once the folder
    is gone."""
    real = Path(os.path.realpath(folder))
    if not real.is_dir():
        raise UnknownAdapterError(f"no adapter named {name!r}: the folder it was loaded from is gone")
    _files_stay_inside(real, real, name, "its folder")
    return real


def listed_adapter(root: str | os.PathLike, name: object) -> Path:
    """``resolve_adapter``, for a folder that also holds an adapter_config.json (what /v1/models lists); raises
    ``UnknownAdapterError`` for another folder (a training run's ``checkpoints/``)."""
    folder = resolve_adapter(root, name)
    if not (folder / CONFIG_NAME).is_file():
        raise UnknownAdapterError(f"no adapter named {name!r}: that folder holds no {CONFIG_NAME}")
    return folder


def list_adapter_names(root: str | os.PathLike) -> list[str]:
    """Names of the subfolders of ``root`` that are valid, safe adapter names and hold an adapter_config.json
    (sorted). Other folders (a training run's ``checkpoints/``, logs) are not adapters: listing them would offer
    clients names that can only fail."""
    names = []
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    for entry in entries:
        try:
            listed_adapter(root, entry)
        except LorakitError:
            continue
        names.append(entry)
    return names
