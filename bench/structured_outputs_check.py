"""GPU check of structured outputs (lorakit/serve/structured.py) in the serving engine with the static decoder.

    python bench/structured_outputs_check.py [--rows 32] [--shape 1b]

The GPU image has no fastapi and no llguidance: the script drives ``lorakit.serve.engine.Engine`` directly (what
the server's endpoints feed) and installs llguidance from the wheel carried in ``.whl/`` (an abi3 wheel without
dependencies: ``pip install --no-index --no-deps``; if pip cannot, the wheel is unpacked into a temp folder).

A random bf16 Llama of ``--shape`` (bench_common.LLAMA_SHAPES; 128k vocabulary, so each mask covers a real
vocabulary's width) behind a ``StaticDecoder`` (CUDA graphs), a small byte-level BPE tokenizer built offline.
Cases, each ``--rows`` requests at once:

  plain        every row unconstrained, greedy (the reference)
  mixed        half the rows as in "plain", half constrained by a JSON schema (sampled, seeds 0..)
  constrained  every row constrained (sampled)

Checks: every constrained row that ends with "stop" parses and matches the schema (all must end: the schema's
strings and arrays are bounded); the plain rows of "mixed" equal those of "plain" token for token (reported: bf16
GEMMs of another batch shape may round differently). Timing: wall ms per engine step (the mask work of the
constrained rows is host time inside the step). Prints a table; writes structured_outputs_check.json to $OUT (or
bench/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                   "ok": {"type": "boolean"}},
                  "required": ["id", "ok"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "tags", "owner"],
    "additionalProperties": False,
}


def ensure_llguidance() -> str:
    try:
        import llguidance  # noqa: F401
        return "installed"
    except ImportError:
        pass
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "llguidance-*.whl")))
    if not wheels:
        raise SystemExit("llguidance is not installed and no .whl/llguidance-*.whl was carried")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", wheels[-1]],
                          capture_output=True, text=True)
    if done.returncode == 0:
        return f"pip install --no-index {Path(wheels[-1]).name}"
    folder = tempfile.mkdtemp()
    zipfile.ZipFile(wheels[-1]).extractall(folder)
    sys.path.insert(0, folder)
    import llguidance  # noqa: F401
    return f"unpacked {Path(wheels[-1]).name} (pip failed: {done.stderr.strip().splitlines()[-1:]})"


def valid(value, schema, where="$") -> bool:
    kinds = {"object": dict, "string": str, "array": list, "boolean": bool}
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) and \
            schema.get("minimum", value) <= value <= schema.get("maximum", value)
    if kind is not None and not isinstance(value, kinds[kind]):
        return False
    if kind == "string":
        return len(value) <= schema.get("maxLength", len(value))
    if kind == "array":
        return len(value) <= schema.get("maxItems", len(value)) and all(valid(v, schema["items"]) for v in value)
    if kind == "object":
        props = schema.get("properties", {})
        if set(schema.get("required", ())) - set(value):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(valid(v, props[k]) for k, v in value.items() if k in props)
    return True


@contextlib.contextmanager
def phase_timers(engine, decoder, device):
    """Within: the wall time of the decoder's step, the formatted rows' masks, the sampling, and the rows' token
    bookkeeping (their constraints consume the token) summed into the yielded dict, each phase closed by a device
    sync so that its GPU work counts in it. Patched on the objects, restored on exit."""
    import torch

    from lorakit.serve import engine as engine_module
    from lorakit.serve import structured

    spent = {"decoder_step": 0.0, "mask_rows": 0.0, "llguidance_masks": 0.0, "sample_rows": 0.0, "accept": 0.0,
             "choose_total": 0.0}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync()
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            sync()
            spent[name] += time.perf_counter() - started
            return result
        return wrapper

    class TimedExecutor:  # llguidance's own share of mask_rows: its threads filling the bitmasks
        def __init__(self, real):
            self.real = real

        def unsafe_compute_mask_ptr(self, *args):
            started = time.perf_counter()
            result = self.real.unsafe_compute_mask_ptr(*args)
            spent["llguidance_masks"] += time.perf_counter() - started
            return result

    import llguidance

    if not structured._EXECUTOR:
        structured._EXECUTOR.append(llguidance.LLExecutor())
    real_executor = structured._EXECUTOR[0]
    structured._EXECUTOR[0] = TimedExecutor(real_executor)
    saved = (decoder.step, engine._accept, engine._choose, structured.mask_rows, engine_module.sample_rows)
    decoder.step = timed("decoder_step", saved[0])
    engine._accept = timed("accept", saved[1])
    engine._choose = timed("choose_total", saved[2])
    structured.mask_rows = timed("mask_rows", saved[3])
    engine_module.sample_rows = timed("sample_rows", saved[4])
    try:
        yield spent
    finally:
        decoder.step, engine._accept, engine._choose = saved[:3]
        structured.mask_rows, engine_module.sample_rows = saved[3:]
        structured._EXECUTOR[0] = real_executor
        for name in ("step", "_accept", "_choose"):
            for obj in (decoder, engine):
                obj.__dict__.pop(name, None)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["The quick brown fox jumps over the lazy dog.", "Names, ages and colours: red green blue {\"a\": 1}.",
            "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.", "Servers answer many requests for many adapters."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--phases", action="store_true",
                        help="also time each phase of an engine step (a device sync after each: slower overall)")
    args = parser.parse_args()
    how = ensure_llguidance()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_common import LLAMA_SHAPES
    from lorakit.decoding import StaticDecoder
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.structured import compile_format

    shapes = {**LLAMA_SHAPES, "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128256)}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only with --shape tiny: a dry run
    assert device == "cuda" or args.shape == "tiny", "this check is for a CUDA GPU (--shape tiny runs on the CPU)"
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    shape = shapes[args.shape]
    config = LlamaConfig(**shape, max_position_embeddings=1024, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    decoder = StaticDecoder(model, max_batch=args.rows, max_len=512)
    decoder.warm_up()
    engine = Engine(model, threading.RLock(), max_batch=args.rows, pad_id=tokenizer.pad_token_id, decoder=decoder)
    stops = (tokenizer.eos_token_id,)
    columns = model.get_output_embeddings().weight.shape[0]
    started = time.perf_counter()
    grammar = compile_format(tokenizer, columns, stops, SCHEMA, "person")
    compile_s = time.perf_counter() - started
    prompts = [tokenizer(f"Person {i}: a name, an age and a colour as JSON.")["input_ids"] for i in range(args.rows)]

    def run(constrained: list[bool]) -> dict:
        finished = threading.Semaphore(0)
        jobs, reasons = [], [None] * len(prompts)
        for i, (prompt, fmt) in enumerate(zip(prompts, constrained)):
            params = SamplingParams(max_new_tokens=args.max_new_tokens if fmt else 64,
                                    temperature=1.0 if fmt else 0.0, seed=i, stop_token_ids=stops)

            def on_finish(reason, i=i):
                reasons[i] = reason
                finished.release()

            jobs.append(Request(prompt, None, params, lambda token, info: True, on_finish,
                                constraint=grammar.constraint() if fmt else None))
        steps = engine.steps
        started = time.perf_counter()
        for job in jobs:
            engine.submit(job)
        for _ in jobs:
            finished.acquire()
        wall = time.perf_counter() - started
        steps = engine.steps - steps
        texts = [tokenizer.decode(job.tokens, skip_special_tokens=True) for job in jobs]
        ok = 0
        for text, reason, fmt in zip(texts, reasons, constrained):
            if fmt and reason == "stop":
                try:
                    ok += valid(json.loads(text), SCHEMA)
                except ValueError:
                    pass
        return {"tokens": [job.tokens for job in jobs], "reasons": reasons, "texts": texts, "wall_s": wall,
                "steps": steps, "ms_per_step": 1000 * wall / max(steps, 1), "constrained": sum(constrained),
                "valid_json": ok}

    run([False] * args.rows)  # warm-up (graphs of every batch size the run passes through)
    cases = {"plain": run([False] * args.rows),
             "mixed": run([i % 2 == 1 for i in range(args.rows)]),
             "constrained": run([True] * args.rows)}
    if args.phases:
        for name, constrained in (("plain", [False] * args.rows), ("constrained", [True] * args.rows)):
            with phase_timers(engine, decoder, device) as spent:
                case = run(constrained)
            cases[name]["phases_ms_per_step"] = {k: round(1000 * v / max(case["steps"], 1), 3)
                                                 for k, v in spent.items()}
    same = sum(cases["mixed"]["tokens"][i] == cases["plain"]["tokens"][i] for i in range(0, args.rows, 2))
    engine.close()
    print(f"llguidance: {how}; schema compiled in {compile_s * 1000:.1f} ms; vocabulary {columns}")
    print(f"{'case':<12} {'rows':>4} {'constr.':>7} {'steps':>6} {'ms/step':>8} {'valid JSON':>10}")
    for name, case in cases.items():
        print(f"{name:<12} {args.rows:>4} {case['constrained']:>7} {case['steps']:>6} {case['ms_per_step']:>8.2f} "
              f"{case['valid_json']:>6}/{case['constrained']}")
    print(f"plain rows of 'mixed' equal to 'plain': {same}/{(args.rows + 1) // 2}")
    for name, case in cases.items():
        if "phases_ms_per_step" in case:
            print(f"phases of '{name}' (ms per step, synced):", case["phases_ms_per_step"])
    errors = [r for case in cases.values() for r in case["reasons"] if r and r.startswith("error")]
    print("errors:", errors[:3] or "none")
    print("example:", next((t for t, r, c in zip(cases["constrained"]["texts"], cases["constrained"]["reasons"],
                                                 [True] * args.rows) if r == "stop"), None))
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "shape": args.shape, "llguidance": how, "compile_ms": compile_s * 1000,
              "plain_rows_unchanged": same, "errors": errors,
              "cases": {k: {key: v for key, v in c.items() if key not in ("tokens", "texts")} for k, c in cases.items()}}
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured_outputs_check.json").write_text(json.dumps(result, indent=1))
    all_ok = not errors and cases["constrained"]["valid_json"] == args.rows and \
        cases["mixed"]["valid_json"] == args.rows // 2
    print("PASS" if all_ok else "FAIL")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
