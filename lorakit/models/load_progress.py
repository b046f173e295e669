"""Progress while transformers reads a model folder's weights (``load_base`` of a dense folder).

transformers 5.x loads the weights in one loop over the model's tensors, which it wraps in its own tqdm
(``transformers.core_model_loading.tqdm``, "Loading weights"). lorakit mutes transformers' bars (a bar for every
small model, and carriage-return redraws in a log file), so a 7B folder loaded in silence for up to a minute. Here
that one loop is counted by :func:`lorakit._progress.slow_work` instead: a bar on a terminal, plain lines in a log,
only once it has taken ``SLOW_WORK_S`` (a small model says nothing), nothing on a torchrun rank other than 0.

Where transformers has no such loop (4.x reads shard by shard in another place), nothing changes: the hook only
replaces a name that exists, for the length of one load, and any other use of it goes to transformers' own.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Iterator

from lorakit._progress import slow_work


@contextlib.contextmanager
def weights_progress(folder: Path) -> Iterator[None]:
    """Inside, transformers' weight-loading loop counts its tensors as ``loading FOLDER: n/N tensors``."""
    try:
        module = importlib.import_module("transformers.core_model_loading")  # 5.x; absent in 4.x
    except ImportError:
        yield
        return
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return

    def counted(iterable=None, *args, **kwargs):
        """tqdm's call as transformers makes it, ``tqdm(items, desc=...)``; anything else goes to its own."""
        if iterable is None or args or set(kwargs) - {"desc", "total"}:
            return original(iterable, *args, **kwargs)
        try:
            total = kwargs.get("total") or len(iterable)
        except TypeError:  # no length to count against
            return original(iterable, *args, **kwargs)
        return slow_work(iterable, f"loading {folder.name}", "tensor", total=total)

    module.tqdm = counted
    try:
        yield
    finally:
        module.tqdm = original
