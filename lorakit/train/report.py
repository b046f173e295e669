"""What a run leaves behind besides the adapter: ``metrics.jsonl``, ``loss_curve.png``, optional TensorBoard logs.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step": ..., "loss": ..., "lr": ..., ...}``
for training steps, ``{"kind": "val", "step": ..., "val_loss": ...}`` for validations and ``{"kind": "eval", ...}``
for the before/after scores. A resumed run first drops the lines of steps after its checkpoint, so the file
reads as if the run had never stopped; its TensorBoard events hide those steps of the earlier event files the
same way (a purge event at the first step written again, which TensorBoard's reader honours).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "loss_curve.png"


class MetricsLog:
    """Append-only JSON lines (flushed per line), mirrored to TensorBoard when asked for."""

    def __init__(self, folder: str | os.PathLike, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(folder) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._handle = open(self.path, "a", encoding="utf-8")
        self._failed = False
        # a resumed run writes its steps again from resume_step + 1: TensorBoard hides those steps of the stopped
        # run's event files (purge_step), as the lines above are dropped from metrics.jsonl, so no step shows twice
        purge = resume_step + 1 if resume_step is not None else None
        self._tb = _tensorboard_writer(Path(folder) / "tensorboard", purge) if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if entry.get("kind") == "eval" or int(entry.get("step", 0)) <= step:
                kept.append(line)
        from lorakit._fs import atomic_write_text

        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, entry: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
        try:
            self._handle.write(json.dumps(clean) + "\n")
            self._handle.flush()
        except OSError as error:  # a full disk: a write error carries no file name, so say which file it was
            self._failed = True
            raise LorakitError(f"writing {self.path} failed ({error.strerror or error}) at step {entry.get('step')}; "
                               "free disk space and continue the run with --resume") from None
        if self._tb is not None and "step" in entry:
            prefix = entry.get("kind", "train")
            for key, value in entry.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", value, entry["step"])

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError:
            if not self._failed:  # else closing retries the line that failed: that error is already said
                raise
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _tensorboard_writer(folder: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LorakitError("--tensorboard needs the tensorboard package: pip install tensorboard "
                           "(or drop --tensorboard; metrics.jsonl has the same numbers)") from None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path:
    """Training loss per step (and validation loss where measured) as a PNG, drawn with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    entries = read_metrics(metrics_path)
    train = [(e["step"], e["loss"]) for e in entries if e.get("kind") == "train" and e.get("loss") is not None]
    val = [(e["step"], e["val_loss"]) for e in entries if e.get("kind") == "val" and e.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o", linewidth=1.5)
    values = [v for _, v in train + val]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")  # a loss that falls by orders of magnitude: the tail stays readable
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    title = title or "lorakit training"
    ax.set_title(_drawable(title))  # the whole title is kept in the PNG's Title text (savefig below)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", metadata={"Title": title})
        os.replace(tmp, png_path)
    except OSError as error:  # a full disk: no half-written hidden file left, and the file named
        tmp.unlink(missing_ok=True)
        raise LorakitError(f"writing {png_path} failed ({error.strerror or error})") from None
    finally:
        plt.close(fig)
    return png_path


def _drawable(text: str) -> str:
    """``text`` with each character the plot's font cannot draw as '?'. A model path in Chinese made matplotlib warn
    'Glyph ... missing from font(s) DejaVu Sans' once per character, in the middle of the run's output, and draw
    boxes anyway."""
    from matplotlib import font_manager

    prop = font_manager.FontProperties()
    find_all = getattr(font_manager.fontManager, "_find_fonts_by_props", None)  # the fallback chain Agg draws with
    paths = find_all(prop) if callable(find_all) else [font_manager.findfont(prop)]
    fonts = [font_manager.get_font(path) for path in paths]
    return "".join(c if c.isspace() or any(font.get_char_index(ord(c)) for font in fonts) else "?" for c in text)
