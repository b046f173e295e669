"""Reading training records from where users keep them: JSONL / JSON (also pandas' ``DataFrame.to_json`` layouts),
CSV / TSV, Parquet, Arrow (compressed too: gzip, zstd, xz, bzip2), a local ``datasets`` folder (``save_to_disk``'s, or the cache ``load_dataset``
writes), a folder of split-named files, or a glob.

:func:`read_many` and :func:`read_records` turn each row into a validated :class:`lorakit.train.formats.Record`
(formats.py says which record shapes are read); this module only finds the rows: the file's kind from its bytes
and suffix, its encoding, the split asked for (``split=VALIDATION_SPLITS`` for ``--val-data``), and a one-line
error naming the file, the line and the fix for anything unreadable.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from lorakit.config import clipped, shown
from lorakit.errors import LorakitError
from lorakit.train.formats import (COMPLETION_LIKE, EXPECTED_SHAPES, IGNORED_FIELDS, KNOWN_FIELDS, MESSAGE_LIKE,
                                   PROMPT_LIKE, Record, validate_record)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)  # what datasets writes: save_to_disk's data-*.arrow, load_dataset's cache name-train.arrow
DATA_SUFFIXES = JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
VALIDATION_SPLITS = ("validation", "valid", "val", "dev", "eval", "test")  # --val-data's split, first found
# a CSV header naming none of these is refused at line 1 (a file without a header, or all columns misnamed); one naming
# other tools' fields (input / output) goes on to the record check, which says what to rename
HEADER_NAMES = KNOWN_FIELDS | {*PROMPT_LIKE, *COMPLETION_LIKE, *MESSAGE_LIKE}


def _nearby_data_file(path: Path) -> Path | None:
    """A data file or folder beside ``path`` with a close name (a typo: ``val.josnl``, ``trian.jsonl``), else None."""
    import difflib

    parent = path.parent
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:  # an unreadable folder: no suggestion
        return None
    names = [p.name for p in entries if p.is_dir() or _data_suffix(p) is not None]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.8)
    return parent / close[0] if close else None


def read_records(path: str | Path, split: str | Sequence[str] | None = None) -> list[Record]:
    """Read and validate every record of one source.

    Args:
        path: a ``.jsonl`` / ``.ndjson`` / ``.json`` file (one JSON object per line; a ``.json`` file may also
            hold one JSON array of objects), a ``.csv`` / ``.tsv`` file with a header row naming the fields, or a folder
            written by ``datasets``' ``save_to_disk`` (needs the ``datasets`` package: ``lorakit[data]``).
        split: for a ``DatasetDict`` folder, which split to read, or a list of them in order of preference
            (the first present is read; :data:`VALIDATION_SPLITS` for a validation set); default "train", or
            the only one.

    Returns:
        The records in file order (blank JSONL lines are skipped).

    Raises:
        LorakitError: a missing path, an unsupported type, an unreadable or malformed line (with its number and
            the reason), a bad record, or a source with no records.
    """
    if isinstance(path, str) and not path.strip():  # "" (an unset variable) is Path("."): every file here
        raise LorakitError("a data path is empty (''); give a data file or a folder of them, e.g. train.jsonl")
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)):  # as given: Path() would make https:// into https:/
        raise LorakitError(f"data {path} is a URL; lorakit reads local files and downloads nothing: download it "
                           f"first (e.g. curl -LO {path}) and give the file")
    path = Path(path).expanduser()  # "~/data.jsonl" from a config file or --data=~/...: no shell expanded it
    if not path.exists() and any(ch in str(path) for ch in "*?["):  # a pattern from a config file (no shell expands it)
        import glob

        found = sorted(glob.glob(str(path), recursive=True))
        if not found:
            raise LorakitError(f"data pattern {path} matches no file; check the folder and the pattern")
        # "data/*" also matches a README or a .gitignore: read the data files it matches and skip the rest, and the
        # metadata a dataset repository or a save_to_disk folder keeps beside them (dataset_infos.json, state.json)
        matches = [m for m in found if Path(m).is_dir() or (_data_suffix(Path(m)) is not None
                                                             and Path(m).name not in METADATA_FILES)]
        if not matches:
            raise LorakitError(f"data pattern {path} matches {len(found)} files but no data file ({', '.join(DATA_SUFFIXES)}"
                               f"), e.g. {Path(found[0]).name}; check the pattern")
        _refuse_compressed_twins(path, matches)
        return [r for match in matches for r in read_records(match, split)]
    if not path.exists():
        parts = [Path(part.strip()) for part in str(path).split(",")]
        if len(parts) > 1 and all(part.exists() for part in parts):  # --data a.jsonl,b.jsonl
            raise LorakitError(f"data file not found: {path}; it names {len(parts)} files joined by a comma: give them "
                               "separately (--data a.jsonl b.jsonl; in a config file a list: data: [a.jsonl, b.jsonl])")
        from lorakit._fs import backslash_hint

        slashed = backslash_hint(path)  # data\train.jsonl from a config file written on Windows
        if slashed:
            raise LorakitError(f"data file not found: {path}{slashed}")
        close = _nearby_data_file(path)  # a typo: val.josnl for val.jsonl
        if close is not None:
            raise LorakitError(f"data file not found: {path}; did you mean {close}?")
        hub = _hub_dataset_hint(str(path))
        if hub:
            raise LorakitError(f"data file not found: {path}; {hub}")
        raise LorakitError(f"data file not found: {path}; check the path (JSONL, CSV or a datasets folder)")
    if path.is_dir():
        kind = _not_data_folder(path)
        if kind:  # its JSON files would be read as records, and the first would fail with "no known field"
            raise LorakitError(f"{path} is {kind}, not training data; give the data files (JSONL, JSON, CSV, TSV, "
                               "Parquet) or a folder of them")
        if _is_datasets_folder(path):
            records = _read_datasets_folder(path, split)
        else:
            try:
                entries = sorted(path.iterdir())
            except OSError as exc:
                raise LorakitError(f"{path}: cannot list the folder ({exc.strerror}); check its permissions") from None
            # datasets' cache folder also holds cache-<fingerprint>.arrow files, the results of .map() / .filter()
            # calls on it: derived data, not a split
            # hidden files are skipped as a shell's * skips them: macOS leaves "._train.jsonl" (AppleDouble metadata,
            # binary) beside each file it copies to a USB stick or packs into a zip or tar
            files = [p for p in entries if p.is_file() and _data_suffix(p) is not None and p.name not in METADATA_FILES
                     and not p.name.startswith(".")
                     and not (_data_suffix(p) in ARROW_SUFFIXES and p.name.startswith("cache-"))]
            _refuse_compressed_twins(path, files)
            split_dirs = [p for p in entries if p.is_dir() and SPLIT_WORDS.get(p.name.lower())]
            if not files and split_dirs:  # data/train/, data/validation/, data/test/: the split asked for
                return read_records(_split_files(path, split_dirs, split)[0], split)
            snapshot = _hub_cache_snapshot(path) if not files else None
            if snapshot is not None:  # ~/.cache/huggingface/hub/datasets--org--name: the files are in a snapshot
                inside = snapshot / "data" if (snapshot / "data").is_dir() else snapshot
                raise LorakitError(f"{path} is a Hugging Face hub cache folder (blobs, refs, snapshots); give the data "
                                   f"files of its snapshot: {inside}")
            if not files:
                subfolders = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
                inside = (f"; it has the subfolder(s) {', '.join(subfolders[:5])}: give the one with the data (a "
                          "downloaded Hugging Face dataset keeps its files in data/)") if subfolders else \
                    "; give the data files themselves"
                raise LorakitError(f"{path} is a folder with no data files ({', '.join(DATA_SUFFIXES)}) and not a "
                                   f"folder saved with datasets' save_to_disk{inside}")
            records = [r for f in _split_files(path, files, split) for r in read_records(f, split)]
    else:
        if not path.is_file():  # a pipe: the shell's <(zcat data.jsonl.gz) is /dev/fd/63, with no type in its name
            raise LorakitError(f"{path} is a pipe or a device (shell process substitution <(...)?), not a data file: "
                               "lorakit reads files (by their type, and again on --resume); save the records first, "
                               "e.g. zcat data.jsonl.gz > train.jsonl, then --data train.jsonl (or give the .gz itself)")
        suffix = _data_suffix(path)
        if suffix is None:
            hint = OTHER_FILE_HINTS.get(path.suffix.lower(), "")
            raise LorakitError(f"{path}: unsupported data file type {''.join(path.suffixes[-2:]) or '(none)'!r}; use "
                               f"{', '.join(DATA_SUFFIXES)} (optionally compressed: .gz, .zst, .xz, .bz2) or a folder "
                               f"saved with save_to_disk{hint}")
        if suffix in PARQUET_SUFFIXES:
            records = _read_parquet(path)
        elif suffix in ARROW_SUFFIXES:
            records = _read_arrow(path)
        else:
            raw = _read_bytes(path)
            records = (_read_jsonl(path, raw, suffix, split) if suffix in JSONL_SUFFIXES
                       else _read_csv(path, raw, delimiter="\t" if suffix == ".tsv" else ","))
    if not records:
        raise LorakitError(f"{path}: no records in it; a data file needs at least one {EXPECTED_SHAPES} record")
    return records


# what to do with files people have that are not data files lorakit reads
OTHER_FILE_HINTS = {
    ".txt": "; for plain text write each document as {\"text\": ...} on its own line of a .jsonl file",
    ".xlsx": "; export the sheet as CSV (CSV UTF-8) first", ".xls": "; export the sheet as CSV (CSV UTF-8) first",
    ".zip": "; unzip it and give the files or their folder",
}
# JSON files of a Hugging Face dataset repository (older ones keep dataset_infos.json beside data/) and of datasets'
# own folders: they describe the data, and read as records they fail with "no known field"
METADATA_FILES = frozenset({"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"})
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "eval": "validation", "test": "test", "testing": "test"}


def _refuse_compressed_twins(folder: Path, files: list[Path]) -> None:
    """A folder holding a file and its compressed copy (train.jsonl and train.jsonl.gz) would train every record
    twice: refused, naming both."""
    given = {Path(f) for f in files}
    twin = next((Path(f) for f in files if Path(f).suffix.lower() in COMPRESSED_SUFFIXES
                 and Path(f).with_suffix("") in given), None)
    if twin is not None:
        raise LorakitError(f"{folder}: holds {twin.stem} and {twin.name}, the same data compressed and not, so every "
                           "record would be read twice; remove one (or give the files themselves)")


def _split_of(file: Path) -> str | None:
    """The split a file's name says it holds ("train-00000-of-00002.parquet", "val.jsonl", "my_test.csv"), or None."""
    stem = file.name.split(".")[0].lower()
    words = stem.replace("-", "_").replace(" ", "_").split("_")
    return next((SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS), None)


def _split_files(folder: Path, files: list[Path], split: str | Sequence[str] | None) -> list[Path]:
    """The files of a folder to read: all of them, or, when their names say which split they hold (train.jsonl,
    val.jsonl, test.jsonl: a folder as Hugging Face lays it out), those of the split asked for ("train" for
    --data; the first of :data:`VALIDATION_SPLITS` present for --val-data), so a test file never trains."""
    splits = {f: _split_of(f) for f in files}
    if all(v is None for v in splits.values()):
        return files
    unnamed = [f.name for f, v in splits.items() if v is None]
    named = ", ".join(f.name for f, v in splits.items() if v is not None)
    if unnamed:
        raise LorakitError(f"{folder}: some files are named for a split ({named}) and some not ({', '.join(unnamed)}), "
                           "so which to train on is unclear; give the data files themselves (or a pattern)")
    wanted = [split] if isinstance(split, str) else list(split or ["train"])
    wanted = [SPLIT_WORDS.get(w, w) for w in wanted]
    chosen = next((w for w in wanted if w in splits.values()), None)
    if chosen is None:
        raise LorakitError(f"{folder}: its files are named for the splits {sorted(set(splits.values()))} ({named}), "
                           f"none of them {'/'.join(dict.fromkeys(wanted))}; give the data files themselves")
    files = [f for f, v in splits.items() if v == chosen]
    subsets = sorted({_shard_subset(f) for f in files} - {None})
    if len(subsets) > 1:  # UltraChat's train_sft-* and train_gen-*: the same chats for two uses, not one split
        raise LorakitError(f"{folder}: its {chosen} files are of {len(subsets)} subsets ({', '.join(subsets)}); give the "
                           f"files of the one to read, e.g. {folder / (subsets[0] + '-*')}")
    return files


def _shard_subset(file: Path) -> str | None:
    """The subset a Hub shard belongs to ("train_sft" of "train_sft-00001-of-00003-ab12.parquet"), or None for a
    file not named as a shard."""
    match = re.match(r"(.+?)-\d{5}-of-\d{5}", file.name)
    return match.group(1) if match else None


def _not_data_folder(path: Path) -> str | None:
    """What a folder that is certainly not data is (a model, an adapter, a lorakit run), or None."""
    if (path / "adapter_config.json").is_file():
        return "an adapter folder (adapter_config.json)"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "a model folder (config.json + safetensors)"
    if (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file():
        return "a lorakit run folder (config.yaml, metrics.jsonl)"
    return None


def _data_suffix(path: Path) -> str | None:
    """The data type of a file name (``.jsonl``, ``.csv``, ``.parquet``, ...; ``x.jsonl.gz`` / ``.zst`` is ``.jsonl``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    return suffix if suffix in DATA_SUFFIXES else None


def _is_datasets_folder(path: Path) -> bool:
    """What save_to_disk writes: dataset_dict.json (a DatasetDict) or state.json + dataset_info.json (a Dataset)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


# compressed files, by their first bytes (and their names): gzip, xz, bzip2 (Python's own modules) and zstd
# (Python 3.14's compression.zstd, or the zstandard package), as Hub datasets ship JSONL (.jsonl.zst, .json.gz)
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"), (b"\x28\xb5\x2f\xfd", "zstd"))
COMPRESSED_SUFFIXES = {".gz": "gzip", ".xz": "xz", ".bz2": "bzip2", ".zst": "zstd"}


def _decompress(path: Path, raw: bytes, kind: str) -> bytes:
    """``raw`` decompressed; a damaged file, or zstd without a module to read it, is one line."""
    if kind == "zstd":
        try:
            from compression import zstd as module  # Python 3.14+
        except ImportError:
            try:
                import zstandard
            except ImportError:
                raise LorakitError(f"{path}: zstd-compressed; reading it needs Python 3.14 or the zstandard package "
                                   f"(pip install zstandard), or decompress it first: zstd -d {path.name}") from None

            def decompress(data: bytes) -> bytes:  # stream: frames written without their size need it
                return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        else:
            decompress = module.decompress
    else:
        import bz2
        import gzip
        import lzma

        decompress = {"gzip": gzip.decompress, "xz": lzma.decompress, "bzip2": bz2.decompress}[kind]
    try:
        return decompress(raw)
    except Exception as exc:  # gzip: OSError/EOFError/zlib.error, lzma.LZMAError, zstd's ZstdError, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"{path}: a damaged {kind} file ({reason}); compress it again or give it uncompressed") from None


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _refuse_lfs_pointer(path: Path, head: bytes) -> None:
    """A Git LFS pointer (the few lines ``git clone`` of a Hugging Face dataset leaves in place of each large file
    when git-lfs is not installed) said as one, with the fix: read as data it was "malformed JSON" or "not a
    readable Parquet file (... magic bytes not found ...)"."""
    if head.startswith(LFS_POINTER):
        raise LorakitError(f"{path}: a Git LFS pointer, not the data (the repository was cloned without git-lfs); "
                           "fetch the files: git lfs install && git lfs pull in the clone, or hf download --repo-type "
                           "dataset ORG/NAME")


def _read_bytes(path: Path, text: bool = True) -> bytes:
    """The file's bytes, decompressed when it is gzip, xz, bzip2 or zstd (:data:`_COMPRESSED`); for a ``text`` file also
    re-encoded from UTF-16 / UTF-32 to UTF-8 and refused when it is binary."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LorakitError(f"{path}: cannot read it ({exc.strerror}); check the file's permissions") from None
    _refuse_lfs_pointer(path, raw)
    kind = next((name for magic, name in _COMPRESSED if raw.startswith(magic)), None)
    if kind == "bzip2" and raw[3:4] not in b"123456789":  # "BZh" then the block size: else text that starts so
        kind = None
    if kind is not None:
        raw = _decompress(path, raw, kind)
    elif path.suffix.lower() in COMPRESSED_SUFFIXES:
        named = COMPRESSED_SUFFIXES[path.suffix.lower()]
        raise LorakitError(f"{path}: named {path.suffix} but not {named}-compressed; rename or recompress it")
    if not text:
        return raw
    # UTF-16 with a BOM is what Windows PowerShell 5's `>` writes; UTF-32's BOM starts with UTF-16's, so it goes first
    codec = next((name for bom, name in _BOMS if raw.startswith(bom)), None)
    if codec:
        try:
            raw = raw.decode(codec).encode("utf-8")
        except UnicodeDecodeError as exc:
            raise LorakitError(f"{path}: starts with a {codec.upper()} byte-order mark but is not {codec.upper()} (byte "
                               f"{exc.start}); save the file as UTF-8") from None
    if raw[:4] == b"PAR1":
        raise LorakitError(f"{path}: a Parquet file with a text file's name; rename it to .parquet")
    if b"\x00" in raw[:4096]:  # JSONL and CSV never hold NUL: an Arrow/pickle/zip/... file under a text name
        head = raw[:4096]
        if head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4:  # ASCII as UTF-16
            raise LorakitError(f"{path}: UTF-16 text without a byte-order mark; save the file as UTF-8")
        raise LorakitError(f"{path}: binary data (NUL bytes), not a JSONL/CSV text file; give the text file, or a "
                           "Parquet file named .parquet")
    return raw


# how reading a JSONL file shows progress inside :func:`reading_progress`: False (not at all), True (a tqdm bar) or
# "lines" (a plain line now and then); a context variable rather than a parameter, so that the recursive readers
# (patterns, folders, splits) need not pass it along
_PROGRESS: ContextVar[bool | str] = ContextVar("lorakit_reading_progress", default=False)


@contextlib.contextmanager
def reading_progress(mode: bool | str) -> Iterator[None]:
    """Inside, reading a data file shows progress as ``mode`` says (see :func:`lorakit.train.data.build_dataset`):
    100k chats take 15 s or more to parse and check, before the model loads. JSONL counts its lines, then its
    records checked; CSV / TSV its lines; Parquet, Arrow and datasets folders their rows. Only once that has taken
    ``PROGRESS_DELAY_S``: a small file says nothing."""
    token = _PROGRESS.set(mode)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _progress(items: Iterable, what: str, unit: str, total: int | None = None):
    """``items``, with progress shown as :func:`reading_progress` asked (the items themselves outside it);
    ``total``: how many there are, when ``items`` has no length (a generator of table rows)."""
    mode = _PROGRESS.get()
    if not mode:
        return items
    from lorakit.train import data  # data imports this module: imported here
    from lorakit.train.evaluate import _bar

    return _bar(items, len(items) if total is None else total, what, mode, unit=unit, delay_s=data.PROGRESS_DELAY_S)


def _reading_lines(path: Path, text: str, before: int = 0):
    """A display of the lines of ``text`` (and ``before`` lines cut off its start) read so far, as
    :func:`reading_progress` asked (``update(n)``: n more lines); for readers that take several lines at a time (a
    CSV row with newlines in its cells). Lines end as Python's universal newlines say (\\n, \\r\\n or \\r)."""
    from lorakit._progress import counter
    from lorakit.train import data  # data imports this module: imported here

    ends = text.count("\n") + text.count("\r") - text.count("\r\n")
    lines = before + ends + (not text.endswith(("\n", "\r")))
    return counter(lines, f"reading {path.name}", _PROGRESS.get(), unit="line", delay_s=data.PROGRESS_DELAY_S)


def _counted_rows(reader, counted, skip: int) -> Iterator[list[str]]:
    """The rows of a ``csv.reader``, counting the lines each one took (a quoted cell may hold newlines) on
    ``counted``, from :func:`_reading_lines`; ``skip``: lines cut off before the reader's text (Excel's sep=)."""
    done = reader.line_num + skip  # the header
    counted.update(done)
    try:
        for cells in reader:
            counted.update(reader.line_num + skip - done)
            done = reader.line_num + skip
            yield cells
    finally:  # the end, or the reader dropped (a bad row's error): the bar is closed
        counted.close()


# rows of a table turned into Python objects at a time: the progress count moves, and a large table is never held
# twice over as Arrow columns and Python rows
TABLE_CHUNK_ROWS = 4096


def _table_rows(table, path: Path) -> Iterator[dict]:
    """The rows of a pyarrow ``table`` as dicts, a chunk at a time, counted as :func:`reading_progress` asked."""
    def rows():
        for start in range(0, table.num_rows, TABLE_CHUNK_ROWS):
            yield from table.slice(start, TABLE_CHUNK_ROWS).to_pylist()

    return _progress(rows(), f"reading {path.name}", "row", total=table.num_rows)


def read_many(paths: str | Path | Iterable[str | Path], split: str | Sequence[str] | None = None) -> list[Record]:
    """Read several sources (or one) and concatenate their records in the order given; ``split`` as in
    :func:`read_records` (pass :data:`VALIDATION_SPLITS` for ``--val-data``)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[Record] = []
    for p in paths:
        records.extend(read_records(p, split))
    return records


def repeated_note(paths: Iterable[str | Path], flag: str) -> str | None:
    """One line naming the files ``paths`` gives more than once (by where they lie, ``./a.jsonl`` = ``a.jsonl``),
    whose records are then read that many times over; None when each is given once. A note, not a refusal:
    giving a file twice is also a way to weigh it up against the others."""
    counts: dict[str, list] = {}
    for path in paths:
        counts.setdefault(os.path.realpath(os.path.expanduser(str(path))), []).append(str(path))
    repeated = [(given[0], len(given)) for given in counts.values() if len(given) > 1]
    if not repeated:
        return None
    files = ", ".join(f"{name} {n} times" for name, n in repeated)
    return (f"note: {flag} gives {files}; each is read that many times over, its records weighed up against the "
            "rest: give a file once unless that is meant")


def unused_validation(path: str | Path, val_fraction: float | None = None) -> str | None:
    """The note for a ``--data`` folder that also holds a validation split, which ``--data`` does not read (it reads
    the train split): a folder of train.jsonl + validation.jsonl (or data/train/ + data/validation/, a Hub download's
    shards) or a ``DatasetDict`` saved with a validation split. None for anything else (a test split is not named:
    it is for the end, not for choosing the best step)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    try:
        if (path / "dataset_dict.json").is_file():
            names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            names = [n for n in names if isinstance(n, str) and _split_of(Path(n)) == "validation"]
        else:
            names = [p.name for p in sorted(path.iterdir()) if (p.is_dir() or _data_suffix(p) is not None)
                     and _split_of(p) == "validation" and p.name not in METADATA_FILES]
    except (OSError, ValueError, AttributeError):  # unreadable: read_records reports it when it reads the folder
        return None
    if not names:
        return None
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    if val_fraction is not None:  # the user asked for a held-out share: said, since the folder's own split is unused
        return (f"note: --data {path} also holds a validation split ({shown}); --val-fraction {val_fraction:g} holds "
                f"out part of its train split instead. To score on the folder's split, pass --val-data {path} in "
                "place of --val-fraction")
    return (f"note: --data {path} also holds a validation split ({shown}), which training does not use; to score it "
            f"during training, pass --val-data {path}")


def _read_jsonl(path: Path, raw: bytes, suffix: str, split: str | Sequence[str] | None = None) -> list[Record]:
    """One JSON object per line; also a JSON array, one (pretty-printed) object, pretty-printed objects one after
    another, or one object wrapping the records (``{"data": [...]}``), whatever the suffix says."""
    if raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":  # a JSON array (also one saved as .jsonl): read it as one
        records = _read_json_array(path, raw)
        if records is not None:
            return records
    objects: list[tuple[str, Any]] = []
    lines = raw.split(b"\n")
    if len(lines) > 1 and not lines[-1]:  # the piece after the final newline: no line (and blank lines are skipped)
        lines.pop()
    for lineno, line in enumerate(_progress(lines, f"reading {path.name}", "line"), start=1):
        where = f"{path.name}:{lineno}"
        try:
            # utf-8-sig on every line: `cat a.jsonl b.jsonl` puts b's byte-order mark (Windows tools write one) at
            # the start of a middle line, where json.loads refuses it
            text = line.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LorakitError(_not_utf8(where, line, exc)) from None
        if not text.strip():
            continue
        try:
            objects.append((where, _DECODER.decode(text)))
        except _KeyTwice as exc:
            raise LorakitError(exc.message(where)) from None
        except (RecursionError, ValueError) as exc:
            if not isinstance(exc, json.JSONDecodeError):
                raise LorakitError(f"{where}: {_unreadable_json(exc)}") from None
            values = _concatenated_json(raw, path.name)  # pretty-printed objects one after another (`jq .` output)
            if values is None:
                comma = exc.msg == "Extra data" and text[exc.pos:].strip() == ","
                fix = ("a comma after the object: JSON Lines has no commas between lines (or make the file one JSON "
                       "array in [...])") if comma else "one object per line"
                fix = _json_fix(text, exc.pos, exc.msg, line=True) or fix
                if text.lstrip().startswith("{'"):  # print(record) / str(record) instead of json.dumps(record)
                    fix = "single quotes are Python's print() of a dict, not JSON: write each record with json.dumps"
                elif lineno == 1 and _csv_header(text):  # a spreadsheet export saved under a JSON name
                    fix = (f"this line is a CSV header ({_csv_header(text)}), not JSON: name the file .csv (or .tsv "
                           "for tabs) and it reads as a table")
                raise LorakitError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); {fix}") from None
            objects = [(f"{path.name}:{line_no}", value) for line_no, value in values]
            break
    if len(objects) == 1 and isinstance(objects[0][1], dict):
        rows = _pandas_rows(objects[0][1])
        if rows is not None:  # df.to_json("train.json"): a table, whose null cells are absent fields (Parquet's rule)
            return [_table_record(row, f"{path.name} row {index}") for index, row in rows]
        wrapped = _wrapped_records(objects[0][1], path, split)
        if wrapped is not None:  # {"data": [...]}, {"version": ..., "examples": [...]}
            key, items = wrapped
            return [validate_record(obj, f"{path.name}[{key}][{i}]") for i, obj in enumerate(items)]
        if suffix == ".json":  # one (pretty-printed) record
            return [validate_record(objects[0][1], path.name)]
    return [validate_record(obj, where) for where, obj in _progress(objects, f"checking {path.name}", "record")]


def _csv_header(line: str) -> str | None:
    """The field names of ``line`` when it is a CSV / TSV header naming a known field ("prompt,completion"), else
    None."""
    delimiter = next((d for d in ("\t", ";", ",") if d in line), None)
    if delimiter is None or line.lstrip()[:1] in ("{", "["):
        return None
    names = [name.strip().strip('"').lower() for name in line.split(delimiter)]
    return ", ".join(names) if any(name in HEADER_NAMES for name in names) else None


def _pandas_rows(obj: Mapping) -> list[tuple[str, dict]] | None:
    """``[(index, row)]`` of a table pandas' ``DataFrame.to_json`` wrote as one object, else None: by default one
    object per column (``{"prompt": {"0": ..., "1": ...}, "completion": {...}}``), with ``orient="index"`` one per
    row (``{"0": {"prompt": ...}, "1": ...}``), with ``orient="split"`` the column names apart from the rows
    (``{"columns": [...], "index": [...], "data": [[...], ...]}``). No record has only digit keys, or only "columns"
    and "data", so none is mistaken for one."""
    columns, data = obj.get("columns"), obj.get("data")
    if (set(obj) <= {"columns", "index", "data"} and isinstance(columns, list) and columns
            and all(isinstance(name, str) for name in columns) and isinstance(data, list)
            and all(isinstance(row, list) and len(row) == len(columns) for row in data)):
        index = obj.get("index") if isinstance(obj.get("index"), list) and len(obj["index"]) == len(data) else None
        return [(str(i), dict(zip(columns, row))) for i, row in zip(index or range(len(data)), data)]
    if not obj or not all(isinstance(value, dict) and value for value in obj.values()):
        return None

    def is_index(keys: Iterable) -> bool:  # pandas' default RangeIndex, as JSON object keys
        return all(isinstance(key, str) and key.isdigit() for key in keys)

    if is_index(obj):
        return list(obj.items())
    index = list(next(iter(obj.values())))
    if is_index(index) and all(list(column) == index for column in obj.values()):
        return [(i, {name: column[i] for name, column in obj.items()}) for i in index]
    return None


def _concatenated_json(raw: bytes, name: str) -> list[tuple[int, Any]] | None:
    """``[(line where it starts, value)]`` when the whole file is JSON values one after another (only whitespace
    between them, at least one spanning several lines), else None (the caller reports the malformed line).
    ``name``: the file's, for the refusal of a key given twice."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    pos, out = 0, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos == len(text):
            break
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except _KeyTwice as exc:
            raise LorakitError(exc.message(f"{name}:{_twice_line(text, pos)}")) from None
        except (ValueError, RecursionError):  # the caller names the line that fails on its own
            return None
        out.append((text.count("\n", 0, pos) + 1, value))
        pos = end
    return out or None


class _KeyTwice(Exception):
    """A key given twice in one JSON object: Python's json (like most readers) keeps the last value without a word,
    so the first one (often the real answer, a column pasted twice) would vanish from training."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key, self.pos = key, None  # pos: where the object holding it opens (set by _twice_line's scan)

    def message(self, where: str) -> str:
        return (f"{where}: the key {shown(self.key)} is given twice in one object; JSON readers keep only the last one, "
                "silently: remove or rename one of them")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: the object as a dict, or :class:`_KeyTwice` for a key it holds twice."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        raise _KeyTwice(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_object)  # every record read from JSON goes through it


def _twice_line(text: str, start: int) -> int:
    """The 1-based line on which the innermost object holding a repeated key opens, in the JSON value at ``start``
    (the line of a pretty-printed record, or of its message, not of the file's first ``[``). Only for the error:
    it reads again with json's pure-Python scanner, whose object parser can be wrapped to see positions."""
    from json.decoder import JSONObject
    from json.scanner import py_make_scanner

    def parse_object(s_and_end, *args, **kwargs):
        try:
            return JSONObject(s_and_end, *args, **kwargs)
        except _KeyTwice as exc:
            exc.pos = s_and_end[1] - 1 if exc.pos is None else exc.pos  # the innermost object's "{"
            raise

    decoder = json.JSONDecoder(object_pairs_hook=_unique_object)
    decoder.parse_object = parse_object
    decoder.scan_once = py_make_scanner(decoder)
    try:
        decoder.raw_decode(text, start)
    except _KeyTwice as exc:
        return text.count("\n", 0, exc.pos if exc.pos is not None else start) + 1
    except (ValueError, RecursionError):  # deeper than the pure-Python scanner reads: the value's first line
        pass
    return text.count("\n", 0, start) + 1


def _wrapped_records(obj: Mapping, path: Path, split: str | Sequence[str] | None = None) -> tuple[str, list] | None:
    """(key, records) for a JSON document that wraps its records in one object (``{"data": [...]}``, also with
    other keys beside it such as "version"; ``{"train": [...], "test": [...]}`` gives the split asked for), else
    None: an object with a record field, no list of objects, or a list of messages (a chat under a misnamed key,
    which the record check reports)."""
    if any(isinstance(k, str) and k.strip().lower() in KNOWN_FIELDS - IGNORED_FIELDS for k in obj):
        return None
    lists = [(k, v) for k, v in obj.items() if isinstance(v, list) and all(isinstance(x, Mapping) for x in v)]
    if len(lists) > 1 and all(isinstance(k, str) and SPLIT_WORDS.get(k.lower()) for k, _ in lists):
        wanted = [split] if isinstance(split, str) else list(split or ["train"])
        wanted = [SPLIT_WORDS.get(w, w) for w in wanted]
        by_split = {SPLIT_WORDS[k.lower()]: (k, v) for k, v in reversed(lists)}
        chosen = next((by_split[w] for w in wanted if w in by_split), None)
        if chosen is None:
            raise LorakitError(f"{path.name}: holds the splits {', '.join(k for k, _ in lists)}, none of them "
                               f"{'/'.join(dict.fromkeys(wanted))}; give a file with that split")
        lists = [chosen]
    if len(lists) != 1:
        return None
    key, items = lists[0]
    if items and ({"role", "from"} & set(items[0])):
        return None
    return str(key), items


def _not_utf8(where: str, data: bytes, exc: UnicodeDecodeError) -> str:
    """The one-line refusal of bytes that are not UTF-8, with the conversion to run when they read as Latin-1."""
    bad = data[exc.start:exc.start + 1]
    column = exc.start - data.rfind(b"\n", 0, exc.start)  # 1-based byte within its line
    hint = "save the file as UTF-8"
    try:
        data.decode("cp1252")
        hint = ("it looks like Latin-1 / Windows-1252 (byte 0x%s is %r there): convert it with "
                "`iconv -f cp1252 -t utf-8 IN > OUT`" % (bad.hex(), bad.decode("cp1252")))
    except UnicodeDecodeError:
        pass
    return f"{where}: not valid UTF-8 (byte {column}); {hint}"


def _unreadable_json(exc: Exception) -> str:
    """Why Python's json gave up on valid-looking JSON: a hostile or broken file, not training data."""
    what = ("arrays or objects nested deeper than Python can read" if isinstance(exc, RecursionError)
            else f"a value Python's json cannot read ({clipped(str(exc), 80)})")  # e.g. an integer of 5,000 digits
    return f"{what}; this is not a training record: fix or remove it"


def _json_fix(text: str, pos: int, msg: str = "", line: bool = False) -> str | None:
    """What to change where json stopped (``msg`` at ``pos`` of ``text``, one JSONL line when ``line``), for the slips of files written by hand or
    by string formatting instead of json.dumps: a comma after the last item, Python's None / True / False, a raw tab
    or line break inside a string, a lone backslash (a Windows path); else None."""
    if text[pos:pos + 1] in ("}", "]") and text[:pos].rstrip().endswith(","):
        return (f"a comma before the closing '{text[pos]}': JSON allows none after the last item (Python code "
                "does): remove it")
    word = next((w for w in ("None", "True", "False") if text.startswith(w, pos)), None)
    if word is not None:
        return f"{word} is Python's, not JSON (null, true, false): write the records with json.dumps"
    names = {"\t": "tab", "\n": "line break", "\r": "carriage return"}
    if msg.startswith("Invalid control character") and pos < len(text):
        what = names.get(text[pos], f"control character U+{ord(text[pos]):04X}")
        return (f"a raw {what} inside a string; JSON writes it as an escape (\\t, \\n, \\u0001): write the records "
                "with json.dumps")
    if msg.startswith("Unterminated string") and line:  # a JSONL line ends where its string was cut, at a "\n"
        return ("the string goes on past the end of the line: a raw line break inside it, which JSON Lines writes as "
                "\\n; write the records with json.dumps")
    if msg.startswith("Invalid \\escape"):
        return ("a backslash that starts no JSON escape (a Windows path?); JSON writes a backslash as \\\\: write "
                "the records with json.dumps")
    return None


def _read_json_array(path: Path, raw: bytes) -> list[Record] | None:
    """The records of a file holding one JSON array; None when it holds one array per line (each a chat)."""
    try:
        text = raw.decode("utf-8-sig")
        items = _DECODER.decode(text)
    except _KeyTwice as exc:
        raise LorakitError(exc.message(f"{path.name}:{_twice_line(text, len(text) - len(text.lstrip()))}")) from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LorakitError(_not_utf8(f"{path.name}:{line}", raw, exc)) from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and exc.lineno > 1 and exc.colno == 1:  # a second array on the next line: JSONL
            return None
        fix = _json_fix(exc.doc, exc.pos, exc.msg)
        raise LorakitError(f"{path.name}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
                           + (f"; {fix}" if fix else "")) from None
    except (RecursionError, ValueError) as exc:
        raise LorakitError(f"{path.name}: {_unreadable_json(exc)}") from None
    return [validate_record(obj, f"{path.name}[{i}]") for i, obj in enumerate(items)]


def _read_csv(path: Path, raw: bytes, delimiter: str = ",") -> list[Record]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LorakitError(_not_utf8(f"{path.name}:{line}", raw, exc)) from None
    # lines end in \n, \r\n or a lone \r (Excel for Mac's "CSV (Macintosh)"): with \n alone, such a file was all one
    # first line, and a ";" or tab separator, or a sep= line, was not seen in it
    first, rest = _first_line(text)
    skip = 0
    if re.fullmatch(r"sep=(.)", first):  # Excel's line naming the separator ("sep=;"), before the header
        delimiter, skip = first[4], 1
        text = rest
        first = _first_line(text)[0]
    elif delimiter == "," and "," not in first and ";" in first:  # Excel in European locales separates with ";"
        delimiter = ";"
    elif delimiter == "," and "," not in first and "\t" in first:  # tab-separated, saved under a .csv name
        delimiter = "\t"
    # a whole document in one cell (long-context data) passes the csv module's default 128 KiB cell limit
    csv.field_size_limit(max(csv.field_size_limit(), min(len(text) + 1, 2**31 - 1)))
    # newline="": the csv module itself handles CRLF line ends and newlines quoted inside cells
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header:
            raise LorakitError(f"{path.name}: empty CSV; the first line must name the fields ({EXPECTED_SHAPES})")
        if not any(name.strip().lower() in HEADER_NAMES for name in header):  # often no header: the first row is data
            cells = ", ".join(repr(clipped(name, 40)) for name in header[:4]) + (", ..." if len(header) > 4 else "")
            raise LorakitError(f"{path.name}:{1 + skip}: the header line names no known field ({cells}); "
                               "the first line of a CSV names its columns: text, or prompt and completion, or messages "
                               "(rename them, or add a header line if that line is data)")
        named = [name.strip() for name in header]
        twice = next((name for name in named if name and named.count(name) > 1), None)
        if twice is not None:  # each row would keep only the last of them: the other column dropped without a word
            columns = " and ".join(str(i + 1) for i, name in enumerate(named) if name == twice)
            raise LorakitError(f"{path.name}:{1 + skip}: the header names {clipped(twice)!r} twice (columns {columns}); each "
                               "row would keep only the last: rename or remove one")
        records, end = [], reader.line_num + skip  # end: the line the last row read ends on
        for cells in _counted_rows(reader, _reading_lines(path, text, skip), skip):
            # a quoted cell with newlines (a long answer) makes a row span lines: it is named by its first line
            start, end = end + 1, reader.line_num + skip
            if not any(cell.strip() for cell in cells):  # a blank line, or one of empty cells (",,": a spreadsheet's
                continue                                   # rows below the data that were once formatted or edited)
            where = f"{path.name}:{start}"
            if [cell.lstrip("\ufeff").strip() for cell in cells] == [name.strip() for name in header]:
                raise LorakitError(f"{where}: this row repeats the header line (files joined with their headers?); "
                                   "remove it")  # `cat a.csv b.csv`: it would train as an example
            if len(cells) > len(header):
                raise LorakitError(f"{where}: {len(cells)} cells but the header has {len(header)}")
            if len(cells) < len(header):
                raise LorakitError(f"{where}: fewer cells than the header's {len(header)}; fill every column")
            records.append(validate_record(dict(zip(header, cells)), where))
        return records
    except csv.Error as exc:
        raise LorakitError(f"{path.name}:{reader.line_num + skip}: malformed CSV ({exc}); check quoting") from None


def _first_line(text: str) -> tuple[str, str]:
    """(the first line of ``text``, the text after its line end), lines ending as universal newlines say."""
    end = re.search(r"\r\n|\r|\n", text)
    return (text[:end.start()], text[end.end():]) if end else (text, "")


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq  # lazy: comes with the datasets package (lorakit[data])
    except ImportError:
        raise LorakitError(f"{path}: reading Parquet needs pyarrow: pip install 'lorakit[data]'") from None
    source: Any = path
    try:
        with open(path, "rb") as handle:
            _refuse_lfs_pointer(path, handle.read(len(LFS_POINTER)))
    except OSError:  # unreadable: pyarrow says why below
        pass
    if path.suffix.lower() in COMPRESSED_SUFFIXES:  # Parquet reads from its end (the footer): decompressed first
        import pyarrow as pa

        source = pa.BufferReader(_read_bytes(path, text=False))
    try:
        table = pq.read_table(source)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for files that are not Parquet
        try:  # a table with two columns of one name is Parquet, but pyarrow cannot tell which one to read
            names = pq.read_schema(source).names
        except Exception:
            names = []
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise LorakitError(f"{path}: the table has two columns named {shown(twice)}; rename or remove one") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"{path}: not a readable Parquet file ({reason})") from None
    return [_table_record(row, f"{path.name} row {i}") for i, row in enumerate(_table_rows(table, path))]


def _read_arrow(path: Path) -> list[Record]:
    """The rows of an Arrow IPC file, in the stream format datasets writes (the file format too)."""
    try:
        import pyarrow as pa  # lazy: comes with the datasets package (lorakit[data])
    except ImportError:
        raise LorakitError(f"{path}: reading Arrow needs pyarrow: pip install 'lorakit[data]'") from None
    try:
        with open(path, "rb") as handle:
            _refuse_lfs_pointer(path, handle.read(len(LFS_POINTER)))
    except OSError:  # unreadable: pyarrow says why below
        pass
    try:
        with pa.input_stream(str(path), compression="detect") as stream:  # detect: gzip for a .gz name
            data = pa.py_buffer(stream.read())
        try:
            table = pa.ipc.open_stream(data).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(data).read_all()
    except Exception as exc:  # ArrowInvalid / OSError for a file that is not Arrow
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"{path}: not a readable Arrow file ({reason})") from None
    names = table.schema.names
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:  # to_pylist would keep the last of them
        raise LorakitError(f"{path}: the table has two columns named {shown(twice)}; rename or remove one")
    return [_table_record(row, f"{path.name} row {i}") for i, row in enumerate(_table_rows(table, path))]


def _hub_dataset_hint(text: str) -> str | None:
    """For a missing data path that reads as a Hub dataset id (``tatsu-lab/alpaca``, no file type): where the
    Hugging Face cache holds it, or how to download it; None for anything else."""
    from lorakit.models.hub_cache import cache_snapshot, hub_cache_root, looks_like_hub_id

    if not looks_like_hub_id(text) or _data_suffix(Path(text)) is not None:
        return None
    try:
        snapshot = cache_snapshot(hub_cache_root() / ("datasets--" + text.replace("/", "--")), holding=None)
    except OSError:  # an unreadable cache: said as not there
        snapshot = None
    if snapshot is not None:
        inside = snapshot / "data" if (snapshot / "data").is_dir() else snapshot
        return f"the Hugging Face dataset {text} is in the local cache: give its files, --data {inside}"
    return (f"if it is a Hugging Face dataset id, lorakit downloads nothing: hf download --repo-type dataset {text} "
            f"--local-dir {text.split('/')[1]}, then give the data files in that folder")


def _hub_cache_snapshot(path: Path) -> Path | None:
    """The snapshot folder of a Hugging Face hub cache folder (``datasets--org--name``: blobs/, refs/main naming
    the snapshot, snapshots/<hash>/), else None."""
    from lorakit.models.hub_cache import cache_snapshot

    try:
        return cache_snapshot(path, holding=None)
    except OSError:  # an unreadable cache folder: read as no snapshot
        return None


def _read_datasets_folder(path: Path, split: str | None) -> list[Record]:
    try:
        import datasets  # lazy: an optional dependency (lorakit[data])
    except ImportError:
        raise LorakitError(f"{path}: reading a datasets folder needs the 'datasets' package: pip install 'lorakit[data]'") from None
    for arrow in sorted(path.glob("**/*.arrow"))[:64]:  # a folder cloned without git-lfs: pointers, not tables
        try:
            with open(arrow, "rb") as handle:
                _refuse_lfs_pointer(arrow, handle.read(len(LFS_POINTER)))
        except OSError:  # unreadable: load_from_disk says why below
            pass
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError/ValueError/... for folders it did not write
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"{path}: not a folder written by datasets' save_to_disk ({reason})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        wanted = [split] if isinstance(split, str) else list(split or ["train"])
        chosen = next((s for s in wanted if s in loaded), None)
        for word in wanted if chosen is None else ():  # train_sft / test_sft (HuggingFaceH4's SFT sets)
            alike = [name for name in names if _split_of(Path(name)) == SPLIT_WORDS.get(word, word)]
            if len(alike) > 1:
                raise LorakitError(f"{path}: has the splits {', '.join(alike)} for {SPLIT_WORDS.get(word, word)}; give "
                                   f"the folder of the one to read (e.g. {path / alike[0]})")
            if alike:
                chosen = alike[0]
                break
        if chosen is None and len(names) == 1 and not isinstance(split, str):
            chosen = names[0]
        if chosen is None:
            raise LorakitError(f"{path}: has splits {names}, none of them {'/'.join(wanted)}; give the split's own "
                               f"folder (e.g. {path / names[0]})")
        split = chosen
        loaded = loaded[split]
        label = f"{path.name}[{split}]"
    else:
        label = path.name
    rows = _progress(loaded, f"reading {label}", "row")  # datasets hands out its rows one by one: slow for 100k
    return [_table_record(row, f"{label} row {i}") for i, row in enumerate(rows)]


def table_records(rows: Iterable[Mapping[str, Any]], name: str) -> list[Record]:
    """The rows of a table held in Python (a pandas ``DataFrame``'s ``to_dict("records")``, a ``datasets.Dataset``)
    as records, read as a Parquet file's rows are: their nulls absent at every depth (a table's struct columns are
    the union of every row's, so one chat's tool call gains another's parameters as null), and the numpy arrays
    pandas gives for list columns (``pd.read_parquet``: a chat's turns, its tool calls) as lists. ``name``: what
    the errors call the table ("training data" -> "training data row 3")."""
    return [_table_record(_plain(row), f"{name} row {i}") for i, row in enumerate(rows)]


def _plain(value: Any) -> Any:
    """``value`` with numpy arrays and scalars (pandas' cells) turned into Python lists and numbers, at any depth."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # ndarray, np.str_, np.int64, ...
        return _plain(value.tolist())
    return value


def _table_record(row: Mapping[str, Any], where: str) -> Record:
    """A table row (Parquet, datasets) as a record. Its null cells count as absent (a column another record's shape
    fills), but a row whose record fields are all null is said to be so: it read as 'no known field in []'."""
    out = _drop_nulls(row)
    nulls = [key for key, value in row.items() if value is None and _names_field(key)]
    if nulls and not any(_names_field(key) for key in out):
        raise LorakitError(f"{where}: {', '.join(map(repr, nulls))} {'is' if len(nulls) == 1 else 'are'} null (an empty "
                           "cell); fill it or drop the row")
    try:
        return validate_record(out, where)
    except LorakitError as error:  # "missing field 'completion'" of a row whose completion cell is empty
        field = getattr(error, "not_text_field", None)
        column = next((key for key in out if isinstance(key, str) and key.strip().lower() == field), None)
        value = out.get(column)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            # "write it as a JSON string" is no advice for a table: its column has a number type
            raise LorakitError(f"{where}: the column {shown(column)} holds numbers ({shown(value)}), not text; convert it before "
                               f"saving the table, e.g. df[{shown(column)}] = df[{shown(column)}].astype(str)") from None
        missing = getattr(error, "missing_field", None)
        null = next((key for key in nulls if key.strip().lower() == missing), None)
        if null is None:
            raise
        raise LorakitError(f"{where}: {shown(null)} is null (an empty cell); fill it or drop the row") from None


def _names_field(key: Any) -> bool:
    """Whether a column is one of a record's fields (not a bookkeeping one such as "id")."""
    return isinstance(key, str) and key.strip().lower() in KNOWN_FIELDS - IGNORED_FIELDS


def _drop_nulls(row: Mapping[str, Any]) -> dict[str, Any]:
    """datasets stores a table, so a column one record lacks comes back as None: treat it as absent.

    The same holds inside a chat (a message without "name" gets name=None when another message has one), and at every
    depth of tool schemas and tool calls: a table has one struct type per column, the union of every row's, so the
    get_weather tool of one row gets the "query": null parameter of another row's search tool, and a call's
    arguments {"city": "Paris"} become {"city": "Paris", "query": null}. Rendered as they read, the model would learn
    schemas and calls with parameters nobody wrote.
    """
    out = {k: v for k, v in row.items() if v is not None}
    if isinstance(out.get("tools"), list):
        out["tools"] = _without_nulls(out["tools"])
    if isinstance(out.get("messages"), list):
        out["messages"] = [
            {k: (_without_nulls(v) if k == "tool_calls" else v) for k, v in m.items() if v is not None}
            if isinstance(m, Mapping) else m for m in out["messages"]
        ]
    return out


def _without_nulls(value: Any) -> Any:
    """``value`` with every mapping entry whose value is None left out, at any depth (list items are kept)."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
