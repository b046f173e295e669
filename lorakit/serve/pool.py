"""Which adapters are in memory: at most ``max_loaded``, least recently used evicted, never one in use.

An adapter is named by its folder under the adapters folder (``lorakit.serve.paths``). Inside the model it gets
an internal name (``lk0``, ``lk1``, ...), so folder names with dots or a reload of the same folder never clash.
A request *pins* its adapter from admission until it finishes; a pinned adapter is neither evicted nor unloaded.

Admission (before an adapter serves): the name is safe, the weights file is under ``max_bytes`` and is
safetensors (never pickle), the config is under ``MAX_CONFIG_BYTES``, its regular expressions (target_modules,
exclude_modules, rank/alpha/layers patterns) match this model's module names within ``REGEX_TIMEOUT_S`` (tried in a
child process: Python's ``re`` has no timeout and holds the GIL, so a catastrophic pattern such as ``(.*.*)*x``
would freeze the whole server), every rank is at most ``max_rank``, and ``lorakit.load_adapter`` accepts it
(config fields, target modules this base has, tensor keys and shapes, the base fingerprint). A refusal changes
nothing: a reload of a loaded adapter whose new files are refused leaves the old version serving. A refusal is
remembered until the folder's files change (size or time), so clients naming a broken adapter again and again
cost one ``stat`` each, not a re-read (nor another regex check). The checks of a load, first or reload, run
without the pool's lock, so other requests pin and unpin their adapters meanwhile (the old version of a reloaded
adapter keeps serving until the new one has passed them and is swapped in). Requests naming an adapter that
another request is loading wait for that load rather than read the files again. The look at a loaded adapter's
folder that each request makes (is it still there?) is made without the lock too.

An adapter whose folder holds a tokenizer (transformers' Trainer and trl save one, with the chat template it was
trained on) brings its own text side (``model_text.ModelText``: template, end-of-turn tokens, reasoning markers),
read at admission as warily as the weights and refused there when its ids disagree with the base's
(``adapter_tokenizer``); requests naming it are rendered and decoded with it (:meth:`AdapterPool.text_of`). It lives
and goes with the adapter: evicted, unloaded or reloaded, the adapter's text side is dropped or read again. The
pool reads adapter tokenizers once it knows the base's (``base_text``, set by the server's state).

A name may also be registered to a folder of its own (:meth:`AdapterPool.register`: vLLM's
``POST /v1/load_lora_adapter`` with a ``lora_name`` and ``lora_path``): one inside the adapters folder under another
name or deeper down, or, only where the operator allowed it (``any_path``: ``--allow-any-lora-path``), anywhere the
server can read. A registered name is served, listed and evicted like a folder's until it is unregistered.

Lock order: the pool's lock, then the model lock. The engine never takes the pool's lock while it holds the
model lock (it releases pins after a step), so the two cannot deadlock.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from lorakit.errors import LorakitError
from lorakit.serve.paths import (UnknownAdapterError, check_name, inside, list_adapter_names, listed_adapter,
                                 resolve_adapter, resolve_registered)

MAX_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is a few KB
REGEX_TIMEOUT_S = 2.0  # a sane pattern over a few thousand module names takes milliseconds


class AdapterRejected(LorakitError):
    """The adapter failed an admission check (the message says which)."""


class AdapterRemoved(UnknownAdapterError):
    """A loaded adapter's folder is gone from the adapters folder (deleted, renamed): it is served no more."""


class AdapterBusy(LorakitError):
    """The adapter is in use (unload), or every loaded adapter is in use and none can be evicted (load)."""


class PathForbidden(LorakitError):
    """A folder to register lies outside the adapters folder, and the operator did not allow that (``any_path``)."""


class NameTaken(AdapterRejected):
    """A name to register is already an adapter folder's of the adapters folder (another folder)."""


@dataclass
class LoadedAdapter:
    name: str
    internal: str
    folder: Path
    rank: int
    alpha: float
    variant: str
    size_bytes: int  # the weights file's
    memory_bytes: int  # what it holds in the model once loaded (copies.held_bytes)
    pins: int = 0
    last_used: float = 0.0
    text: Any = None  # the ModelText of the tokenizer its folder holds; None: the base's serves it

    def describe(self) -> dict:
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "variant": self.variant,
                "size_bytes": self.size_bytes, "memory_bytes": self.memory_bytes, "in_use": self.pins,
                "tokenizer": "adapter" if self.text is not None else "base"}


class Admitted(NamedTuple):
    """What an admission read and checked: the ``AdapterFile``, and the adapter's text side (or None)."""

    file: Any
    text: Any


class AdapterPool:
    """Loads, pins and evicts adapters of one adapters folder on one model."""

    def __init__(self, model: nn.Module, root: str | os.PathLike, model_lock: threading.RLock, max_loaded: int = 8,
                 max_rank: int = 64, max_bytes: int = 512 * 2**20, any_path: bool = False):
        if max_loaded < 1:
            raise LorakitError(f"--max-loaded must be at least 1, got {max_loaded}")
        self.model = model
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise LorakitError(f"--adapters {self.root} is a file, not a folder; give the folder that holds one adapter "
                               "per subfolder (for a single adapter: its parent folder)")
        if not self.root.is_dir():
            raise LorakitError(f"adapters folder {self.root} does not exist; create it and put one adapter per subfolder")
        self.model_lock = model_lock
        self.max_loaded, self.max_rank, self.max_bytes = max_loaded, max_rank, max_bytes
        self.any_path = any_path  # register() takes folders outside the adapters folder too (--allow-any-lora-path)
        self._registered: dict[str, Path] = {}  # name -> the real folder it serves from (register)
        self._loaded: collections.OrderedDict[str, LoadedAdapter] = collections.OrderedDict()  # LRU first
        # a plain Lock, not Condition's default RLock: no method takes it twice, and _admit_unlocked's one release
        # must free it (an RLock taken twice would stay held through the seconds of an admission)
        self._cond = threading.Condition(threading.Lock())
        self._ids = itertools.count()
        self._refused: dict[str, tuple[tuple, str]] = {}  # name -> (file stamp, message)
        self._first_loads: set[str] = set()  # names not in memory whose files a request is reading and placing now
        self.loads = 0
        self.evictions = 0
        # the base's text side and --reasoning-parser: adapter folders' tokenizers are checked against it and read
        # only once it is set (a pool without it, as lorakit.serve's tests build, serves every adapter the base's)
        self.base_text = None
        self.reasoning_choice = "auto"

    # -- queries -------------------------------------------------------------------------------------------------
    def available(self) -> list[str]:
        """The names a request may use: the adapters folder's, then the registered ones whose folder is there."""
        names = list_adapter_names(self.root)
        own = set(names)
        with self._cond:  # a snapshot: register() may run meanwhile
            registered = sorted(self._registered)
        for name in registered:
            if name not in own and self._still_listed(name):
                names.append(name)
        return names

    def listed(self, name: object) -> Path:
        """The real folder adapter ``name`` serves from (registered, else the adapters folder's of that name), which
        holds an adapter_config.json; raises ``UnsafeNameError`` or ``UnknownAdapterError`` otherwise."""
        from lorakit.io import CONFIG_NAME

        registered = self._registered.get(name) if isinstance(name, str) else None
        if registered is None:
            return listed_adapter(self.root, name)
        folder = resolve_registered(registered, check_name(name))
        if not (folder / CONFIG_NAME).is_file():
            raise UnknownAdapterError(f"no adapter named {name!r}: that folder holds no {CONFIG_NAME}")
        return folder

    def registered(self, name: str) -> Path | None:
        """The folder registered to ``name`` (:meth:`register`), or None."""
        return self._registered.get(name)

    def _still_listed(self, name: str) -> bool:
        try:
            self.listed(name)
        except LorakitError:
            return False
        return True

    def _resolve(self, name: object) -> Path:
        """``name``'s real folder: its registered one, else ``resolve_adapter`` in the adapters folder. No lock:
        one dict lookup is atomic."""
        check_name(name)
        registered = self._registered.get(name)
        return resolve_registered(registered, name) if registered is not None else resolve_adapter(self.root, name)

    def loaded(self) -> list[dict]:
        with self._cond:
            return [a.describe() for a in self._loaded.values()]

    def loaded_names(self) -> set[str]:
        with self._cond:
            return set(self._loaded)

    def is_loaded(self, name: str) -> bool:
        with self._cond:
            return name in self._loaded

    def text_of(self, name: str):
        """The text side (``ModelText``) of adapter ``name``, which the caller has pinned: its folder's tokenizer,
        or None where it has none (the base's then serves it). No lock: a pinned entry is neither evicted nor
        swapped for a reload, and one dict lookup is atomic."""
        entry = self._loaded.get(name)
        return entry.text if entry is not None else None

    # -- pins ----------------------------------------------------------------------------------------------------
    def acquire(self, name: str, timeout: float = 60.0, cancelled: threading.Event | None = None) -> str:
        """Pin adapter ``name`` (loading it, evicting the least recently used idle one if needed).

        Returns the adapter's internal name for ``lorakit.mixed_batch``. Raises ``UnsafeNameError``,
        ``UnknownAdapterError``, ``AdapterRejected``, or ``AdapterBusy`` after ``timeout`` s with no free room,
        or as soon as ``cancelled`` is set while it waits for room (its client has gone: nothing is loaded).
        """
        with self._cond:
            return self._pin(self._ensure_loaded(name, timeout, cancelled))

    def pin_loaded(self, name: str) -> str | None:
        """``acquire`` of an adapter in memory now (its internal name); None, having done nothing, for one that is
        not: the caller then waits for ``acquire`` apart, so requests on loaded adapters never queue behind those
        that wait for room to load theirs."""
        with self._cond:
            while True:
                entry = self._loaded.get(name)
                if entry is None:
                    return None
                if self._check_on_disk(entry):
                    return self._pin(entry)

    def _pin(self, entry: LoadedAdapter) -> str:
        entry.pins += 1
        entry.last_used = time.monotonic()
        self._loaded.move_to_end(entry.name)
        return entry.internal

    def release(self, name: str) -> None:
        with self._cond:
            entry = self._loaded.get(name)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
            self._cond.notify_all()

    # -- registered names (vLLM's load_lora_adapter) ---------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike) -> Path | None:
        """Serve adapter ``name`` from folder ``path`` (relative: to the server's working directory) from now on;
        nothing is loaded (:meth:`load` does that). Returns the folder registered to ``name`` before (None: none),
        which :meth:`restore` puts back where the load then fails.

        ``path`` must lie inside the adapters folder unless ``any_path``: ``PathForbidden`` is raised before
        anything at ``path`` is looked at, so a client cannot probe the server's disk. The adapters folder's own
        folder of that name is served as it is (no registration); another of its folders' names is
        ``NameTaken``; a path that is no adapter folder ``UnknownAdapterError``."""
        from lorakit.io import CONFIG_NAME

        check_name(name)
        shown = os.fspath(path)[:200]
        if "\x00" in os.fspath(path):  # no path holds one (os.path raises ValueError)
            raise AdapterRejected(f"lora_path {shown!r} holds a NUL character; send the adapter folder's path")
        real = Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
        if real == Path(os.path.realpath(self.root)):  # was told it is "outside the adapters folder" (a 403)
            raise UnknownAdapterError(f"lora_path {shown!r} is the adapters folder itself (--adapters), which holds "
                                      "one adapter per subfolder; send the folder of one adapter in it")
        if not self.any_path and not inside(self.root, real):
            raise PathForbidden(f"lora_path {shown!r} is outside the adapters folder this server serves (--adapters); "
                                "put the adapter there, or start the server with --allow-any-lora-path to load "
                                "adapters from any folder it can read")
        try:
            # a file (adapter_config.json itself, the weights) was told "no such folder", as if nothing were there
            why = None if real.is_dir() else (f"that is a file, not a folder; send the folder that holds {CONFIG_NAME}"
                                              if real.exists() else "no such folder")
            why = why or (None if (real / CONFIG_NAME).is_file() else f"that folder holds no {CONFIG_NAME}")
        except OSError as error:  # a name too long, a folder it may not read
            why = error.strerror or type(error).__name__
        if why is not None:
            raise UnknownAdapterError(f"no adapter at lora_path {shown!r}: {why}")
        resolve_registered(real, name)  # its files must not link elsewhere
        own = Path(os.path.realpath(self.root / name))
        with self._cond:
            before = self._registered.get(name)
            if real == own:  # the adapters folder's own adapter of that name: served as it is
                self._registered.pop(name, None)
                return before
            if before is None and os.path.isdir(own) and os.path.isfile(own / CONFIG_NAME):
                raise NameTaken(f"lora_name {name!r} is already the adapter folder {name!r} of --adapters; choose "
                                "another lora_name (or send that folder's path to reload it)")
            self._registered[name] = real
            return before

    def restore(self, name: str, before: Path | None) -> None:
        """Undo :meth:`register` (``before``: what it returned)."""
        with self._cond:
            if before is None:
                self._registered.pop(name, None)
            else:
                self._registered[name] = before

    def unregister(self, name: str) -> None:
        """Stop serving registered adapter ``name``: unloaded (``AdapterBusy`` while requests use it, which leaves
        it registered) and forgotten; ``UnknownAdapterError`` for a name not registered."""
        with self._cond:
            if name not in self._registered:
                raise UnknownAdapterError(f"adapter {name!r} was not loaded by path")
            entry = self._loaded.get(name)
            if entry is not None:
                if entry.pins:
                    raise AdapterBusy(f"adapter {name!r} is serving {entry.pins} request(s); unload it when they "
                                      "finish")
                self._unload_locked(name)
            del self._registered[name]

    # -- explicit load / unload ----------------------------------------------------------------------------------
    def load(self, name: str, timeout: float = 60.0) -> dict:
        """Load (or reload from disk, when idle) adapter ``name``; returns its description.

        A reload checks the new files without the pool's lock (the old version serves meanwhile), loads them next
        to the old version and swaps only when they pass every check. Of two loads of one name at once, each swaps
        in what it read in turn: one adapter of that name remains, the other's version deleted.
        """
        with self._cond:
            old = self._loaded.get(name)
            if old is None:
                return self._ensure_loaded(name, timeout).describe()
            self._refuse_busy(old)
            self._check_on_disk(old)
            folder, admitted = self._admit_unlocked(name)  # refused: nothing changed, the old version serves on
            # meanwhile requests may have pinned it, another load swapped in its version, or an eviction dropped it
            current = self._loaded.get(name)
            if current is None:
                return self._place(name, folder, admitted, timeout).describe()
            self._refuse_busy(current)
            fresh = self._load_new(name, folder, admitted)  # refused: ``current`` keeps serving
            self._loaded[name] = fresh
            with self.model_lock:
                self._delete(current.internal)
            self._cond.notify_all()
            return fresh.describe()

    @staticmethod
    def _refuse_busy(entry: LoadedAdapter) -> None:
        if entry.pins:
            raise AdapterBusy(f"adapter {entry.name!r} is serving {entry.pins} request(s); reload it when they finish")

    def unload(self, name: str) -> None:
        with self._cond:
            entry = self._loaded.get(name)
            if entry is None:
                check_name(name)
                raise UnknownAdapterError(f"adapter {name!r} is not loaded")
            if entry.pins:
                raise AdapterBusy(f"adapter {name!r} is serving {entry.pins} request(s); unload it when they finish")
            self._unload_locked(name)

    # -- internals (hold self._cond) -----------------------------------------------------------------------------
    def _ensure_loaded(self, name: str, timeout: float, cancelled: threading.Event | None = None) -> LoadedAdapter:
        """``name``'s entry, loading it first if needed. Of requests naming one adapter not in memory, the first
        reads and places it; the others wait for that (up to ``timeout`` s, or until ``cancelled``) and then take
        its entry, or, when it failed, try themselves (a refusal is remembered: that costs them a ``stat``). Each
        reading the files itself held one more copy of its tensors: forty clients naming a 500 MB adapter at once
        held 20 GB."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self._loaded.get(name)
            if entry is not None:
                if self._check_on_disk(entry):
                    return entry
                continue  # the pool changed while the folder was looked at: look again
            if name not in self._first_loads:
                break
            if cancelled is not None and cancelled.is_set():
                raise AdapterBusy(f"the request for adapter {name!r} was cancelled while it waited for the adapter "
                                  "to load")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AdapterBusy(f"adapter {name!r} did not finish loading (another request loads it) within "
                                  f"{timeout:g} s")
            self._cond.wait(left if cancelled is None else min(left, 0.2))  # the event cannot notify the condition
        check_name(name)  # refuses unsafe names before any file is opened
        self._first_loads.add(name)
        try:
            folder, admitted = self._admit_unlocked(name)  # refuse before evicting anything for it
            return self._place(name, folder, admitted, timeout, cancelled)
        finally:
            self._first_loads.discard(name)
            self._cond.notify_all()

    def _place(self, name: str, folder: Path, admitted: Admitted, timeout: float,
               cancelled: threading.Event | None = None) -> LoadedAdapter:
        """Load admitted adapter ``name`` into room made by evicting idle ones (waiting up to ``timeout`` s for
        one to become idle), or return the version another request loaded while this one checked or waited."""
        entry = self._loaded.get(name)  # loaded by another request while this one checked the files
        if entry is not None:
            return entry
        deadline = time.monotonic() + timeout
        while len(self._loaded) >= self.max_loaded:
            idle = next((n for n, a in self._loaded.items() if a.pins == 0), None)
            if idle is not None:
                self._unload_locked(idle)
                self.evictions += 1
                continue
            if cancelled is not None and cancelled.is_set():
                raise AdapterBusy(f"the request for adapter {name!r} was cancelled while it waited for room")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AdapterBusy(f"all {self.max_loaded} loaded adapters are in use (--max-loaded) and none came "
                                  f"free within {timeout:g} s")
            self._cond.wait(left if cancelled is None else min(left, 0.2))  # the event cannot notify the condition
            entry = self._loaded.get(name)  # another thread may have loaded it meanwhile
            if entry is not None:
                return entry
        entry = self._load_new(name, folder, admitted)
        self._loaded[name] = entry
        return entry

    def _check_on_disk(self, entry: LoadedAdapter) -> bool:
        """Raise ``AdapterRemoved`` when loaded ``entry``'s folder is no longer an adapter folder of the adapters
        folder (deleted or renamed while loaded: /v1/models no longer lists it), and unload it unless requests
        still use it (the last one's release leaves it idle, and the next request naming it unloads it). Only a
        changed file is left alone: that is a new version, which POST /v1/adapters/load swaps in.

        The folder is looked at with the pool's lock let go: every request on an adapter asks this, and under the
        lock the requests of every adapter queued behind each other's ``stat`` calls (a slow or network disk).
        Returns False when ``entry`` is no longer the name's entry afterwards (evicted, reloaded): the caller
        looks again; True when it is and its folder is there."""
        self._cond.release()
        try:
            self.listed(entry.name)
            listed = True
        except LorakitError:
            listed = False
        finally:
            self._cond.acquire()
        if self._loaded.get(entry.name) is not entry:
            return False
        if listed:
            return True
        if not entry.pins:
            self._unload_locked(entry.name)
        if entry.name in self._registered:
            raise AdapterRemoved(f"no adapter named {entry.name!r}: the folder it was loaded from was removed while "
                                 f"it was loaded{'' if entry.pins else ', so it is unloaded'}; load it again")
        raise AdapterRemoved(f"no adapter named {entry.name!r} in the adapters folder: its folder was removed while "
                             f"it was loaded{'' if entry.pins else ', so it is unloaded'}; put the folder back to "
                             "serve it again")

    def _load_new(self, name: str, folder: Path, admitted: Admitted) -> LoadedAdapter:
        """Load admitted adapter ``name`` under a fresh internal name (the caller puts it in ``_loaded``)."""
        from lorakit.inject import adapter_names

        adapter_file = admitted.file
        internal = f"lk{next(self._ids)}"
        with self.model_lock:
            try:
                ranks, held = self._load_into_model(name, folder, adapter_file, internal)
            except BaseException:
                # whatever failed (out of memory in inject, an error while compacting), no part of this adapter
                # may stay in the model: nothing in the pool names it, so nothing would ever delete it
                if internal in adapter_names(self.model):
                    self._delete(internal)
                raise
        config = adapter_file.config
        self.loads += 1
        return LoadedAdapter(name, internal, folder, max(ranks or [config.r]), config.alpha, config.variant,
                             adapter_file.size_bytes, held, last_used=time.monotonic(), text=admitted.text)

    def _load_into_model(self, name: str, folder: Path, adapter_file, internal: str) -> tuple[list[int], int]:
        """Put ``adapter_file`` into the model as ``internal`` (held: the model lock); returns its ranks per layer
        and the bytes it holds. Raises ``AdapterRejected`` (remembered) for what the model refuses."""
        from lorakit.inject import adapter_hosts, lora_layers
        from lorakit.io import load_adapter
        from lorakit.serve.copies import compact_copies, held_bytes

        try:
            self._check_targets(name, adapter_file.config)
            # what _admit checked, not a re-read; never a resize of the shared base for one adapter's vocabulary
            load_adapter(self.model, adapter_file, adapter=internal, resize_vocabulary=False)
        except LorakitError as error:
            message = self._inside(str(error) if isinstance(error, AdapterRejected) else (
                f"adapter {name!r} refused: {self._public_names(str(error), internal, name)}"))
            self._refused[name] = (_stamp(folder), message)
            raise AdapterRejected(message) from None
        ranks = [layer.adapters[internal].rank for layer in lora_layers(self.model).values() if internal in layer.adapters]
        if ranks and max(ranks) > self.max_rank:  # the file changed between the check and the load
            self._refuse_loaded(name, folder, internal, f"rank {max(ranks)} is above --max-rank {self.max_rank}; "
                                f"start the server with --max-rank {max(ranks)} or more to serve it")
        # peft's trainable tokens (and modules_to_save copies that changed a few rows) load as whole copies of
        # the embedding / head: keep only their trained rows, then count what the adapter really holds
        compact_copies(self.model, internal)
        held = held_bytes(self.model, internal)
        if held > self.max_bytes:
            self._refuse_loaded(name, folder, internal, f"it holds {held:,} bytes in memory once loaded (LoRA "
                                "tensors in float32, whole copies of modules it saved), over the limit of "
                                f"{self.max_bytes:,} (--max-adapter-mb); raise the limit, or merge the adapter "
                                "into the base")
        # every call routes its rows itself (generation._routing); left active, the adapter's copies would be
        # what code outside a call reads as the module's .weight (a RowOverride builds it whole for that)
        for host in adapter_hosts(self.model).values():
            host.set_active([n for n in host.active if n != internal])
        return ranks, held

    def _refuse_loaded(self, name: str, folder: Path, internal: str, why: str) -> None:
        """Take back adapter ``name``, just loaded as ``internal``, and refuse it (remembered as ``_admit``'s
        refusals are: the next request naming it costs a ``stat``, not another load)."""
        self._delete(internal)
        message = f"adapter {name!r} refused: {why}"
        self._refused[name] = (_stamp(folder), message)
        raise AdapterRejected(message)

    def _public_names(self, text: str, internal: str, name: str) -> str:
        """``text`` with the model's internal adapter names ('lk0', ...) as the names clients know (an error of
        ``load_adapter`` that names another loaded adapter, such as one holding LoRA where this one has a copy)."""
        names = {entry.internal: entry.name for entry in self._loaded.values()} | {internal: name}
        return re.sub(r"'(lk\d+)'", lambda match: repr(names.get(match.group(1), match.group(1))), text)

    def _admit_unlocked(self, name: str) -> tuple[Path, Admitted]:
        """``name``'s folder (``resolve_adapter``) and :meth:`_admit` of it, with the pool's lock let go (the
        caller holds it, once: it is not re-entrant): its checks take seconds (regex probes, a file read), and
        meanwhile other requests must pin their adapters and the engine's thread unpin theirs (it stalled every
        stream of the server when a request finished during an admission). The caller re-reads ``_loaded``
        afterwards: anything in it may have changed."""
        self._cond.release()
        try:
            folder = self._resolve(name)
            return folder, self._admit(name, folder)
        finally:
            self._cond.acquire()

    def _admit(self, name: str, folder: Path) -> Admitted:
        """Checks on the files alone (no model): size, format, config, regexes, ranks, the tokenizer. Returns what
        they read (``Admitted``)."""
        stamp = _stamp(folder)
        refused = self._refused.get(name)
        if refused is not None and refused[0] == stamp:
            raise AdapterRejected(refused[1])
        try:
            return self._admit_files(name, folder)
        except AdapterRejected as error:
            message = self._inside(str(error))
            self._refused[name] = (stamp, message)
            raise AdapterRejected(message) from None

    def _inside(self, text: str) -> str:
        """``text`` (a refusal, which clients read) with paths given inside the adapters folder: its absolute path
        would show any client how the server's disk is laid out."""
        for prefix in sorted({os.path.realpath(self.root), os.path.abspath(self.root)}, key=len, reverse=True):
            text = text.replace(prefix.rstrip(os.sep) + os.sep, "")
        return text

    def _admit_files(self, name: str, folder: Path):
        from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter

        config_path = folder / CONFIG_NAME
        if folder.is_dir() and not folder.is_symlink() and not (folder / WEIGHTS_NAME).exists():
            # peft's save_pretrained of an adapter named "x" into adapters/x writes adapters/x/x: no client can name
            # that folder (names have no slash), so the operator moves the files up
            nested = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink()
                            and (p / CONFIG_NAME).is_file())
            if nested:
                raise AdapterRejected(f"adapter {name!r} refused: {folder} holds peft's named-adapter subfolder "
                                      f"{', '.join(nested[:3])} instead of the adapter files: move the files of "
                                      f"{folder / nested[0]} up into {folder} (one adapter per folder under --adapters)")
        if config_path.is_file() and config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterRejected(f"adapter {name!r} refused: {CONFIG_NAME} is {config_path.stat().st_size:,} bytes, "
                                  f"over the limit of {MAX_CONFIG_BYTES:,}")
        try:
            adapter_file = read_adapter(folder, max_bytes=self.max_bytes, follow_symlinks=False)  # no link swapped in
        except LorakitError as error:
            raise AdapterRejected(f"adapter {name!r} refused: {error}") from None
        except RecursionError:  # json nested thousands deep
            raise AdapterRejected(f"adapter {name!r} refused: {CONFIG_NAME} is nested too deeply") from None
        except ValueError as error:  # e.g. an integer of thousands of digits
            raise AdapterRejected(f"adapter {name!r} refused: {CONFIG_NAME}: {str(error).split(';')[0]}") from None
        config = adapter_file.config
        self._check_patterns(name, config)
        ranks = [config.r, *config.rank_pattern.values()]
        ranks += [t.shape[0] for k, t in adapter_file.tensors.items() if k.endswith(("lora_A.weight", "lora_embedding_A")) and t.dim() == 2]
        rewrite = adapter_file.base_rewrite  # peft's PiSSA / OLoRA: loaded as a plain LoRA of twice the rank
        if max(ranks) * (2 if rewrite else 1) > self.max_rank:
            how = f" (a {rewrite} adapter of rank {max(ranks)} loads at rank {2 * max(ranks)})" if rewrite else ""
            raise AdapterRejected(f"adapter {name!r} refused: rank {max(ranks) * (2 if rewrite else 1)} is above "
                                  f"--max-rank {self.max_rank}{how}; start the server with --max-rank "
                                  f"{max(ranks) * (2 if rewrite else 1)} or more to serve it")
        return Admitted(adapter_file, self._read_text(name, folder))

    def _read_text(self, name: str, folder: Path):
        """The text side of the tokenizer in adapter ``name``'s folder (``adapter_tokenizer.adapter_text``), or
        None; a tokenizer that cannot serve is the adapter's refusal, in one line."""
        if self.base_text is None:
            return None
        from lorakit.serve.adapter_tokenizer import adapter_text

        try:
            return adapter_text(folder, name, self.base_text, self.model, self.reasoning_choice)
        except LorakitError as error:
            raise AdapterRejected(f"adapter {name!r} refused: {error}") from None
        except Exception as error:  # whatever else transformers raises for a broken tokenizer folder
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise AdapterRejected(f"adapter {name!r} refused: cannot load its tokenizer: {reason}") from None

    def _check_patterns(self, name: str, config) -> None:
        """Refuse regular expressions that take more than ``REGEX_TIMEOUT_S`` on this model's module paths."""
        from lorakit._regex_guard import RegexTooSlow, check_regexes
        from lorakit.inject import _base_modules

        with self.model_lock:  # an adapter loading in another thread (under the pool's lock) adds modules
            paths = [p for p in _base_modules(self.model) if p]
        try:
            check_regexes(config, paths, f"adapter {name!r} refused: its adapter_config.json", timeout=REGEX_TIMEOUT_S)
        except RegexTooSlow as error:
            raise AdapterRejected(str(error)) from None

    def _check_targets(self, name: str, config) -> None:
        """Every module name in a target list must exist in this base (PEFT skips missing ones silently)."""
        if not isinstance(config.target_modules, (list, tuple)):
            return
        from lorakit.inject import _base_modules

        paths = [p for p in _base_modules(self.model) if p]
        missing = [key for key in config.target_modules if not any(p == key or p.endswith("." + key) for p in paths)]
        if missing:
            raise AdapterRejected(f"adapter {name!r} refused: target module(s) {', '.join(map(repr, missing))} do not "
                                  "exist in this base model; it was made for another architecture")

    def _unload_locked(self, name: str) -> None:
        """Drop ``name`` (held: ``self._cond``)."""
        entry = self._loaded.pop(name)
        with self.model_lock:
            self._delete(entry.internal)
        self._cond.notify_all()

    def _delete(self, internal: str) -> None:
        from lorakit.adapters import delete_adapter

        delete_adapter(self.model, internal)


def _stamp(folder: Path) -> tuple:
    """What changes when an adapter folder's files change: (name, size, mtime_ns, inode) of each file in it."""
    stamp = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    info = entry.stat()
                except OSError:
                    continue
                stamp.append((entry.name, info.st_size, info.st_mtime_ns, info.st_ino))
    except OSError:
        return ()
    return tuple(sorted(stamp))
