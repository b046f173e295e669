"""Figures for docs/PERFORMANCE.md from the recorded JSON under bench/results/ (no GPU needed).

    python bench/plot_results.py            # writes docs/img/*.png

Each figure reads only recorded measurements; a missing results file skips its figure with a note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "img"
COLORS = {"peft": "#9e9e9e", "peft+compile": "#5c6bc0", "lorakit+compile": "#e65100", "lorakit": "#e65100",
          "base": "#424242"}


def _load(name: str):
    path = RESULTS / name
    if not path.is_file():
        print(f"skipped: {path} not found", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def training_speed(plt) -> Path | None:
    """Tokens/s and peak memory per case: PEFT, PEFT + torch.compile and lorakit (compiled layers), same runs."""
    rows = []
    for name in ("train_speed_8b_b1_compile_v5.json", "train_speed_8b_b4ckpt_compile_v4.json",
                 "train_speed_1b_compile_v3.json"):
        rows += _load(name) or []
    rows = [r for r in rows if "tokens_per_s" in r]
    if not rows:
        return None
    cases = list(dict.fromkeys(r["case"] for r in rows))
    systems = ["peft", "peft+compile", "lorakit+compile"]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.27
    for k, system in enumerate(systems):
        by_case = {r["case"]: r for r in rows if r["system"] == system}
        xs = [i + (k - 1) * width for i in range(len(cases))]
        peft = {r["case"]: r["tokens_per_s"] for r in rows if r["system"] == "peft"}
        values = [by_case[c]["tokens_per_s"] / peft[c] if c in by_case else 0 for c in cases]
        bars = speed.bar(xs, values, width, label=system, color=COLORS[system])
        speed.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=8)
        memory.bar(xs, [by_case[c]["peak_gib"] if c in by_case else 0 for c in cases], width, label=system,
                   color=COLORS[system])
    for axis, title in ((speed, "tokens/s relative to PEFT (higher is better)"),
                        (memory, "peak GPU memory, GiB (lower is better)")):
        axis.set_xticks(range(len(cases)), [c.replace("ckpt", "\ncheckpointing") for c in cases])
        axis.set_title(title, fontsize=10)
        axis.spines[["top", "right"]].set_visible(False)
    speed.legend(frameon=False, fontsize=8)
    fig.suptitle("LoRA training on one H200 (Llama shapes, r=16 on 7 projections, seq 2048)", fontsize=11)
    fig.tight_layout()
    return _save(fig, "training_speed.png")


def serving(plt) -> Path | None:
    """Generated tokens/s against concurrent clients, 1 and 8 adapters, on the H200 and on the 2-core CPU."""
    panels = [(name, _load(name)) for name in ("serve_bench_h200_1b.json", "serve_bench_h200_smol.json",
                                                "serve_bench.json")]
    panels = [(n, d) for n, d in panels if d]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (name, record) in zip(axes[0], panels):
        for adapters, style in ((1, "-o"), (8, "--s")):
            rows = [r for r in record["results"] if r["adapters"] == adapters]
            axis.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], style,
                      label=f"{adapters} adapter{'s' if adapters > 1 else ''}", color="#e65100" if adapters == 1 else "#5c6bc0")
        _log2_axis(axis, [1, 8, 32], "concurrent clients")
        axis.set_ylabel("generated tokens/s")
        device = "CPU, 2 cores" if record["device"] == "cpu" else record["device"]
        axis.set_title(f"{record['model']} ({device})", fontsize=10)
        axis.legend(frameon=False, fontsize=8)
    fig.suptitle("lorakit serve end to end over HTTP (continuous batching)", fontsize=11)
    fig.tight_layout()
    return _save(fig, "serving.png")


def multi_adapter(plt) -> Path | None:
    """Prefill tokens/s relative to the base model against the number of distinct adapters in the batch."""
    panels = [(shape, _load(f"multi_adapter_{shape}_{v}.json")) for shape, v in (("1b", "v2"), ("8b", "v1"))]
    panels = [(s, d) for s, d in panels if d]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), sharey=True, squeeze=False)
    for axis, (shape, rows) in zip(axes[0], panels):
        for system in ("lorakit", "peft"):
            points = sorted((r["adapters"], r["ratio_vs_base"]) for r in rows
                            if r["case"].startswith("prefill") and r["system"] == system)
            if points:
                axis.plot(*zip(*points), "-o", label="PEFT adapter_names" if system == "peft" else "lorakit SGMV",
                          color=COLORS[system])
        axis.axhline(0.85, color="#424242", linestyle=":", linewidth=1, label="target 0.85x")
        _log2_axis(axis, [1, 8, 64], "distinct adapters in the batch")
        axis.set_ylim(0, 1.05)
        axis.set_title(f"prefill 64 x 512, {shape.upper()} shape", fontsize=10)
    axes[0][0].set_ylabel("tokens/s relative to the base model")
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.suptitle("Mixed-adapter batches on one H200", fontsize=11)
    fig.tight_layout()
    return _save(fig, "multi_adapter_prefill.png")


def decode_step(plt) -> Path | None:
    """Decode step time against distinct adapters: lorakit's static decoder, the same model under transformers'
    forward in a CUDA graph, and the bandwidth bound (bytes read per step over the copy bandwidth), same runs."""
    panels = [(shape, _load(name)) for shape, name in (("8b", "multi_adapter_8b_v8.json"), ("1b", "multi_adapter_1b_v7.json"))]
    panels = [(s, d) for s, d in panels if d]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    labels = ["base", "1", "8", "64"]
    for axis, (shape, rows) in zip(axes[0], panels):
        def series(case, field="step_ms"):
            found = {}
            for r in rows:
                if r["case"] == f"decode-{shape}-{case}" and r.get("fuse_lora") in (None, "on") and field in r:
                    found.setdefault(r["adapters"], r[field])
            return [found.get(n) for n in (0, 1, 8, 64)]

        x = list(range(len(labels)))
        axis.plot(x, series("graph"), "-s", color=COLORS["peft"], label="transformers forward, CUDA graph")
        axis.plot(x, series("static"), "-o", color=COLORS["lorakit"], label="lorakit static decoder")
        axis.plot(x, series("static", "bound_ms"), ":", color=COLORS["base"], label="bandwidth bound")
        for xi, step, bound in zip(x, series("static"), series("static", "bound_ms")):
            if step and bound:
                axis.annotate(f"{bound / step:.0%}", (xi, step), textcoords="offset points", xytext=(0, 6),
                              ha="center", fontsize=8, color=COLORS["lorakit"])
        axis.set_xticks(x, labels)
        axis.set_xlabel("distinct adapters over 64 sequences")
        axis.set_ylim(0, None)
        axis.spines[["top", "right"]].set_visible(False)
        axis.set_title(f"decode, 64 x 512 context, {shape.upper()} shape", fontsize=10)
    axes[0][0].set_ylabel("ms per step (percent: of the bound)")
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.suptitle("One decode step with mixed adapters on one H200", fontsize=11)
    fig.tight_layout()
    return _save(fig, "multi_adapter_decode.png")


def _log2_axis(axis, ticks: list[int], label: str) -> None:
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.set_xlabel(label)
    axis.spines[["top", "right"]].set_visible(False)


def _save(fig, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for figure in (training_speed, serving, multi_adapter, decode_step):
        path = figure(plt)
        if path:
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
