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


def smoothed(values: list[float], span: int) -> list[float]:
    """Exponential moving average of ``values`` over about ``span`` points, debiased as TensorBoard's smoothing (the
    first points are not pulled towards 0): the trend of a per-step loss that jumps from batch to batch."""
    beta = 1.0 - 2.0 / (span + 1)
    out, average = [], 0.0
    for n, value in enumerate(values, 1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** n))
    return out


# fewer train points than this are drawn as they are (with markers): a trend of a handful of steps means nothing
SMOOTH_FROM = 20


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path:
    """Training loss per step (and validation loss where measured) as a PNG, drawn with matplotlib's Agg backend.

    Past :data:`SMOOTH_FROM` steps the raw per-step loss is drawn faint under its moving average (a span of a
    twentieth of the points), so the trend reads through the batch-to-batch noise; a short run's few steps are
    drawn as points. The best validation loss is marked and labelled with its value and step (the ``best/`` adapter).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    entries = read_metrics(metrics_path)
    train = [(e["step"], e["loss"]) for e in entries if e.get("kind") == "train" and e.get("loss") is not None]
    val = [(e["step"], e["val_loss"]) for e in entries if e.get("kind") == "val" and e.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if len(train) >= SMOOTH_FROM:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", linewidth=0.8, alpha=0.3, label="train loss (per step)")
        ax.plot(steps, smoothed(list(losses), max(2, len(train) // 20)), color="tab:blue", linewidth=2,
                label="train loss (smoothed)")
    elif train:  # a point each: a one-step run's single loss is still seen (a line of one point draws nothing)
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2, marker=".", markersize=6)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o", linewidth=1.5)
        best_step, best = min(val, key=lambda point: (point[1], point[0]))  # the first of equal ones, as training keeps
        ax.plot([best_step], [best], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"best validation {best:.4g} (step {best_step})")
    values = [v for _, v in train + val]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")  # a loss that falls by orders of magnitude: the tail stays readable
    ax.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator

    steps = [int(step) for step, _ in train + val]
    if steps and max(steps) - min(steps) < 10:  # steps are whole: no "0.96" ticks around a short run
        ax.set_xticks(range(min(steps), max(steps) + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (nats per supervised token)")
    title = title or "lorakit training"
    ax.set_title(_drawable(title))  # the whole title is kept in the PNG's Title text (savefig below)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(loc="best")
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


def prompt_style(records) -> dict[str, Any]:
    """How a run's training examples framed their prompts, kept in ``results.json`` so that ``lorakit generate
    --adapter RUN/adapter "..."`` asks the adapter as it was trained.

    Returns ``{"prompt_format": ..., "system_prompt": ...}``. prompt_format: "chat" when every record is a chat
    (rendered through the chat template), "plain" when none is (text and prompt/completion records are plain text:
    a chat template around the prompt is a frame the adapter never saw), None for a mix; "alpaca" or "question"
    (:data:`lorakit.train.formats.PROMPT_FRAMES`) when every record is an Alpaca (or question/answer) record that a
    tokenizer without a chat template trained in that prompt format. system_prompt: the system turn every chat
    starts with (or the system text before every framed prompt), when they all start with the same one (the
    embedded task's "Extract the order as JSON."); else None. ``records``: the run's training records
    (:class:`lorakit.train.formats.Record`), as the tokenizer trained them.
    """
    frames = {record.frame[:2] if record.frame else None for record in records}
    kinds = {frame[0] if frame else None for frame in frames}
    if len(kinds) == 1 and None not in kinds:  # "### Response:" is the whole cue such an adapter learnt to answer
        systems = {frame[1] for frame in frames}
        return {"prompt_format": next(iter(kinds)),
                "system_prompt": (next(iter(systems)) or None) if len(systems) == 1 else None}
    shapes = {record.shape for record in records}
    prompt_format = "chat" if shapes == {"messages"} else "plain" if shapes and "messages" not in shapes else None
    systems = set()
    for record in records:
        if record.shape == "messages":
            turns = record.fields.get("messages") or [{}]
            first = turns[0] if isinstance(turns[0], dict) else {}
            content = first.get("content") if first.get("role") == "system" else None
            systems.add(content if isinstance(content, str) and content.strip() else None)
            if len(systems) > 1:
                break
    system_prompt = next(iter(systems)) if prompt_format == "chat" and len(systems) == 1 else None
    return {"prompt_format": prompt_format, "system_prompt": system_prompt}


def example_prompt(records, longest: int = 60) -> str | None:
    """A prompt of the run's own data to show in the next command (the first record's prompt or first user turn),
    when it is one short line; else None. The first turn: generate asks one turn, which opens a chat as the first
    one did in training, while a later one ("thanks" in ShareGPT's chats) answers turns generate does not send. Kept
    as written, trailing space included: a plain-text prompt is completed token for token, and "Answer: " and
    "Answer:" are different prompts to a BPE tokenizer."""
    for record in records[:1]:
        if record.frame:  # an Alpaca instruction (or question) that generate frames as training did
            text = record.frame[2]
        elif record.shape == "prompt_completion":
            text = record.fields.get("prompt")
        elif record.shape == "messages":
            users = [turn.get("content") for turn in record.fields.get("messages") or []
                     if isinstance(turn, dict) and turn.get("role") == "user"]
            text = users[0] if users else None
        else:
            return None
        if isinstance(text, str) and text.strip() and not any(c in text for c in "\r\n") and len(text) <= longest:
            return text
    return None


def next_commands(adapter_dir: str | os.PathLike, model: str, full: bool, prompt: str | None,
                  validation: bool) -> str:
    """The ``next:`` line a finished run ends with: the commands that use what it wrote, ready to paste (paths and the
    prompt shell-quoted; ``--model`` named unless it is the commands' default)."""
    import shlex

    from lorakit.commands._args import DEFAULT_MODEL

    where = shlex.quote(str(adapter_dir))
    if full:  # the whole fine-tuned model is the --model of the next commands
        load = f"--model {where}"
    else:
        load = (f"--model {shlex.quote(str(model))} " if str(model) != DEFAULT_MODEL else "") + f"--adapter {where}"
    commands = [f"lorakit generate {load} {shlex.quote(prompt or 'YOUR PROMPT')}"]
    if validation:  # eval without --data scores the run's validation data, which a run without one lacks
        commands.append(f"lorakit eval {load}")
    return "next: " + "  |  ".join(commands)
