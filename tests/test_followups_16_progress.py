"""Progress for long work, without slowing it down.

1. Scoring (before / after training, ``lorakit eval``) split generation into at least 8 batches when progress was
   shown, only so that a bar of batches moved: on a GPU, several times slower than one large batch. Now the batch
   size is the one asked for, and the count is of decode steps inside each batch (a transformers streamer), with the
   records done beside it: the bar moves during a single long batch, and the answers are the same.

Every model is the tiny random Llama of test_train_helpers (a word-level tokenizer with a ChatML-like template)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from lorakit.cli import main
from lorakit.train.evaluate import generate_records, score_generations
from lorakit.train.formats import validate_record
from lorakit.train.generation_progress import GenerationProgress
from test_train_helpers import task_records, tiny_folder, tiny_tokenizer, tiny_train_model, write_jsonl  # noqa: F401

STEPS = re.compile(r"^generating: (\d+)/(\d+) steps, (\d+)/(\d+) records done, \d:\d\d:\d\d elapsed, "
                   r"\d:\d\d:\d\d left$", re.M)


def _records(n: int, seed: int = 3):
    return [validate_record(r, f"val[{i}]") for i, r in enumerate(task_records(n, seed=seed, shape="messages"))]


class _Calls:
    """Counts model.generate calls and the rows of each (the batches), passing everything through."""

    def __init__(self, model):
        self.rows, self.inner = [], model.generate

        def generate(*args, **kwargs):
            self.rows.append(kwargs["input_ids"].shape[0])
            return self.inner(*args, **kwargs)

        model.generate = generate


@pytest.fixture(scope="module")
def model():
    return tiny_train_model(seed=0)


def test_progress_keeps_the_batches_and_the_answers(model, capsys):
    """The same records, batch size and limits give the same generations and batches with or without progress,
    a bar or lines; before, progress at batch size 16 ran 4 batches of 4."""
    records, tokenizer = _records(16), tiny_tokenizer()
    calls = _Calls(model)
    plain = generate_records(model, tokenizer, records, max_new_tokens=8, batch_size=16)
    assert calls.rows == [16] and capsys.readouterr().err == ""
    for mode in ("lines", True):
        calls.rows.clear()
        assert generate_records(model, tokenizer, records, max_new_tokens=8, batch_size=16, progress=mode) == plain
        assert calls.rows == [16], mode  # one batch, as asked: not split for the display
    calls.rows.clear()
    six = generate_records(model, tokenizer, records, max_new_tokens=8, batch_size=6, progress="lines")
    assert calls.rows == [6, 6, 4] and six == generate_records(model, tokenizer, records, max_new_tokens=8,
                                                                batch_size=6)
    del model.generate  # the instance's wrapper: back to the class's


def test_scores_are_the_same_with_progress(model):
    records, tokenizer = _records(12, seed=5), tiny_tokenizer()
    quiet = score_generations(model, tokenizer, records, batch_size=12, max_new_tokens=8)
    shown = score_generations(model, tokenizer, records, batch_size=12, max_new_tokens=8, progress="lines")
    assert (shown.predictions, shown.matches, shown.exact_match) == (quiet.predictions, quiet.matches, quiet.exact_match)


def test_one_long_batch_moves_in_a_log(model, capsys):
    """16 records in one batch of 30 steps: about a dozen lines counting steps 1..30, not one line at the end."""
    records = _records(16)
    generate_records(model, tiny_tokenizer(), records, max_new_tokens=30, batch_size=16, progress="lines")
    err = capsys.readouterr().err
    seen = [tuple(map(int, m.groups())) for m in STEPS.finditer(err)]
    assert "\r" not in err and len(seen) == len(err.strip().splitlines()), err
    assert 5 <= len(seen) <= 12, err
    assert seen[0][:2] == (1, 30) and seen[-1] == (30, 30, 16, 16), err
    assert [s[0] for s in seen] == sorted(set(s[0] for s in seen)), err  # steps only go up


def test_one_long_batch_moves_on_a_bar(model, capsys):
    import time

    forward = model.forward

    def slowed(*args, **kwargs):  # tqdm redraws at most every 0.1 s: on an idle machine 20 tiny steps took less
        time.sleep(0.03)
        return forward(*args, **kwargs)

    model.forward = slowed
    try:
        generate_records(model, tiny_tokenizer(), _records(8), max_new_tokens=20, batch_size=8, progress=True)
    finally:
        del model.forward  # the instance's wrapper: back to the class's
    err = capsys.readouterr().err
    assert "\r" in err and "generating" in err and "step" in err, err
    assert "/20 " in err and "0/8 records done" in err, err  # a step count inside the one batch, with the rows
    assert not STEPS.search(err)


def test_rows_that_stop_early_are_counted_as_they_stop(model, capsys):
    """With a stop token the random model writes now and then, rows end at different steps of one batch: the
    records-done count rises during the batch, and ends at every record; the generations are the same."""
    records, tokenizer = _records(16, seed=7), tiny_tokenizer()
    free = generate_records(model, tokenizer, records, max_new_tokens=16, batch_size=16)
    firsts = {g.text.split()[0] for g in free if g.text.split()}
    rows = Counter(w for g in free for w in set(g.text.split()) if w not in firsts)
    stop_word = max(rows, key=lambda w: min(rows[w], 16 - rows[w]))  # a word about half of the rows write
    plain = generate_records(model, tokenizer, records, max_new_tokens=16, batch_size=16, eot_token=stop_word)
    stopped = sum(g.stopped for g in plain)
    assert 0 < stopped < 16, [g.text for g in plain]
    capsys.readouterr()
    shown = generate_records(model, tokenizer, records, max_new_tokens=16, batch_size=16, eot_token=stop_word,
                             progress="lines")
    assert shown == plain
    seen = [tuple(map(int, m.groups())) for m in STEPS.finditer(capsys.readouterr().err)]
    done = [s[2] for s in seen]
    assert done == sorted(done) and done[-1] == 16, seen
    # some row ran to the limit: before the last step, the rows that stopped (some, not all) were done
    assert 0 < max(d for (n, _, d, _) in seen if n < 16) <= stopped, seen


def test_the_step_count_follows_the_streamed_tokens(capsys):
    """The count itself, on the tokens transformers streams: the prompt first (not a step), then one token per row
    and step; a stop token ends a row (the padding after it is not counted again); a batch that ends early (every
    row stopped) jumps to the end of its budget; a batch that cannot generate counts its rows as done."""
    shown = GenerationProgress(total_steps=10, records=5, mode="lines", stop_ids=[3, 7])
    first = shown.streamer(rows=3, budget=6)
    first.put(torch.tensor([[1, 2, 4], [1, 5, 6], [0, 1, 2]]))  # the prompt (B, L)
    first.put(torch.tensor([5, 3, 6]))  # row 1 stops
    first.put(torch.tensor([7, 3, 3]))  # row 0 stops by the second stop id; row 1's padding is no new row
    first.put(torch.tensor([7, 7, 3]))  # the last row stops: generate ends here, 3 of 6 steps in
    assert (first.steps, first.counted, shown.done) == (3, 3, 3)
    shown.finished(first)
    assert shown.shown.n == 6
    shown.skipped(1)  # a prompt that fills the context
    second = shown.streamer(rows=1, budget=4)
    second.put(torch.tensor([[1, 2]]))
    for _ in range(4):
        second.put(torch.tensor([5]))
    shown.finished(second)
    shown.close()
    assert shown.done == 5 and shown.shown.n == 10
    seen = [tuple(map(int, m.groups())) for m in STEPS.finditer(capsys.readouterr().err)]
    assert seen[0] == (1, 10, 1, 5) and seen[-1] == (10, 10, 5, 5), seen
    assert (6, 10, 3, 5) in seen or all(n != 6 for n, *_ in seen), seen
    assert GenerationProgress(4, 2, False, [3]).streamer(2, 4) is None  # progress off: generate gets no streamer


def test_eval_generates_in_the_batch_asked_for(tmp_path, tiny_folder, capsys, monkeypatch):  # noqa: F811
    """`lorakit eval` of 12 records at its default --batch-size 16 into a log: one batch (before: 3 batches of 4),
    whose steps are counted in plain lines."""
    from transformers import LlamaForCausalLM

    rows = []
    inner = LlamaForCausalLM.generate

    def generate(self, *args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    data = write_jsonl(tmp_path / "val.jsonl", task_records(12, seed=2))
    code = main(["eval", "--model", str(tiny_folder), "--data", str(data), "--max-new-tokens", "6", "--samples", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert rows == [12], rows
    seen = [tuple(map(int, m.groups())) for m in STEPS.finditer(captured.err)]
    assert seen and seen[-1] == (seen[-1][1], seen[-1][1], 12, 12) and seen[-1][1] <= 6, captured.err
    assert "\r" not in captured.err and "exact match" in captured.out


# -- 2. reading CSV, Parquet, Arrow and datasets folders shows progress, as JSONL does ---------------------------------
def _lines_of(err: str, name: str, unit: str) -> list[tuple[int, int]]:
    found = re.findall(rf"^reading {re.escape(name)}: (\d+)/(\d+) {unit}, \d:\d\d:\d\d elapsed, \d:\d\d:\d\d left$",
                       err, re.M)
    return [(int(n), int(total)) for n, total in found]


@pytest.fixture
def no_delay(monkeypatch):
    """Any file counts as large: progress from the first line (the default waits PROGRESS_DELAY_S = 1.5 s)."""
    from lorakit.train import data as data_module

    monkeypatch.setattr(data_module, "PROGRESS_DELAY_S", 0.0)


def _csv(path, n: int, delimiter: str = ","):
    """n prompt/completion rows; every fifth answer holds a newline (a quoted cell: its row spans two lines)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["prompt", "completion"])
        for i, r in enumerate(task_records(n, seed=4)):
            writer.writerow([r["prompt"], r["completion"] + ("\nthen stop" if i % 5 == 0 else "")])
    return path


def test_a_large_csv_counts_its_lines(tmp_path, capsys, no_delay):
    """A CSV read inside reading_progress (where `lorakit train` and `lorakit eval` read their data) counts its
    lines, multi-line rows included, up to the file's line count; outside it, silent; the records are the same."""
    from lorakit.train.sources import read_many, reading_progress

    path = _csv(tmp_path / "train.csv", 400)
    plain = read_many(path)
    assert capsys.readouterr().err == ""
    with reading_progress("lines"):
        counted = read_many(path)
    err = capsys.readouterr().err
    seen = _lines_of(err, "train.csv", "lines")
    assert counted == plain and len(plain) == 400
    assert "\r" not in err and 3 <= len(seen) <= 12, err
    assert seen[-1] == (481, 481), err  # 1 header + 400 rows + 80 answers with a newline
    assert all(total == 481 for _, total in seen) and [n for n, _ in seen] == sorted(n for n, _ in seen), err


def test_a_tsv_on_a_terminal_gets_a_bar(tmp_path, capsys, no_delay):
    from lorakit.train.sources import read_many, reading_progress

    path = _csv(tmp_path / "train.tsv", 50, delimiter="\t")
    with reading_progress(True):
        assert len(read_many(path)) == 50
    err = capsys.readouterr().err
    assert "\r" in err and "reading train.tsv" in err and "/61" in err and "line" in err, err


def test_a_bad_csv_row_still_says_which(tmp_path, no_delay):
    """The counting wraps the rows: a row with too many cells is still named by its line."""
    from lorakit.errors import LorakitError
    from lorakit.train.sources import read_many, reading_progress

    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with reading_progress("lines"), pytest.raises(LorakitError, match=r"bad\.csv:3: 3 cells but the header has 2"):
        read_many(path)


def _table(n: int):
    import pyarrow as pa

    return pa.Table.from_pylist(task_records(n, seed=6))


def test_parquet_and_arrow_count_their_rows(tmp_path, capsys, no_delay, monkeypatch):
    """Parquet and Arrow files turn into Python rows a chunk at a time (here 64 rows), counted against the table's
    rows; before, one to_pylist of the whole table, silent. The records are the same as outside the display."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorakit.train import sources
    from lorakit.train.sources import read_many, reading_progress

    monkeypatch.setattr(sources, "TABLE_CHUNK_ROWS", 64)
    pq.write_table(_table(300), tmp_path / "train.parquet")
    table = _table(200)
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:  # the stream format datasets writes
        writer.write_table(table)
    for name, n in (("train.parquet", 300), ("data-00000-of-00001.arrow", 200)):
        plain = read_many(tmp_path / name)
        assert capsys.readouterr().err == ""
        with reading_progress("lines"):
            counted = read_many(tmp_path / name)
        err = capsys.readouterr().err
        seen = _lines_of(err, name, "rows")
        assert counted == plain and len(plain) == n == len(task_records(n, seed=6))
        assert 3 <= len(seen) <= 12 and seen[0] == (1, n) and seen[-1] == (n, n), err
        assert plain[0]["prompt"] == task_records(n, seed=6)[0]["prompt"]


def test_a_datasets_folder_counts_its_rows(tmp_path, capsys, no_delay):
    import datasets

    from lorakit.train.sources import read_many, reading_progress

    datasets.Dataset.from_list(task_records(120, seed=8)).save_to_disk(str(tmp_path / "saved"))
    capsys.readouterr()
    with reading_progress("lines"):
        records = read_many(tmp_path / "saved")
    seen = _lines_of(capsys.readouterr().err, "saved", "rows")
    assert len(records) == 120 and seen[-1] == (120, 120), seen


def test_eval_counts_reading_and_tokenizing_its_data(tmp_path, tiny_folder, capsys, no_delay):  # noqa: F811
    """`lorakit eval --data big.csv > log` said nothing while it read and tokenized the file (train showed both):
    now plain lines for each, before the scoring's."""
    data = _csv(tmp_path / "val.csv", 40)
    code = main(["eval", "--model", str(tiny_folder), "--data", str(data), "--no-generate", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert _lines_of(captured.err, "val.csv", "lines")[-1] == (49, 49), captured.err
    tokenizing = re.findall(r"^tokenizing \S*val\.csv: (\d+)/40 records, ", captured.err, re.M)
    assert tokenizing and tokenizing[-1] == "40", captured.err
    assert captured.err.index("reading val.csv") < captured.err.index("tokenizing") < captured.err.index("loss: ")


# -- 3. library work a user waits on: quantizing, loading 4-bit, merging, combining, writing GGUF ---------------------
def _counted(err: str, what: str, unit: str) -> list[tuple[int, int]]:
    found = re.findall(rf"^{re.escape(what)}: (\d+)/(\d+) {unit}, \d:\d\d:\d\d elapsed, \d:\d\d:\d\d left$", err, re.M)
    return [(int(n), int(total)) for n, total in found]


@pytest.fixture
def slow(monkeypatch):
    """Any work counts as slow (the default shows nothing before SLOW_WORK_S = 3 s); rank 0 or no torchrun."""
    import lorakit._progress

    monkeypatch.setattr(lorakit._progress, "SLOW_WORK_S", 0.0)
    monkeypatch.delenv("RANK", raising=False)


def _lora_llama(*adapters: str, vocab_size: int = 128):
    import lorakit
    from conftest import tiny_llama

    model = tiny_llama(seed=1, vocab_size=vocab_size)
    for name in adapters or ("default",):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter=name)
        with torch.no_grad():  # a nonzero update (lora_B starts at zero)
            for module_name, parameter in model.named_parameters():
                if "lora_B" in module_name and f".{name}" in module_name:
                    parameter.normal_(0, 0.02)
    return model


def test_quantizing_to_nf4_counts_its_layers_in_a_log(capsys, slow):
    """lorakit.quantize of a 7B on a CPU is minutes of silence: now its layers are counted (14 here: 7 per block)."""
    from lorakit.quant.quantize import quantize
    from conftest import tiny_llama

    quantize(tiny_llama())
    err = capsys.readouterr().err
    seen = _counted(err, "quantizing to NF4", "layers")
    assert "\r" not in err and seen[0] == (1, 14) and seen[-1] == (14, 14) and len(seen) <= 14, err


def test_quick_work_and_other_ranks_say_nothing(capsys, monkeypatch):
    """A tiny model is done long before SLOW_WORK_S: nothing printed, as before. A torchrun process other than
    rank 0 never shows it (each one loads the model)."""
    import lorakit._progress
    from lorakit.quant.quantize import quantize
    from conftest import tiny_llama

    monkeypatch.delenv("RANK", raising=False)
    quantize(tiny_llama())
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(lorakit._progress, "SLOW_WORK_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun sets both (RANK alone is not a torchrun job: lorakit._rank)
    quantize(tiny_llama())
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_that_is_cleared(capsys, slow, monkeypatch):
    import sys

    from lorakit.quant.quantize import quantize
    from conftest import tiny_llama

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    quantize(tiny_llama())
    err = capsys.readouterr().err
    assert "\r" in err and "quantizing to NF4" in err and "/14 [" in err and "layer" in err, err
    assert err.endswith("\r"), err  # cleared at the end (leave=False): what follows starts on a clean line
    assert not _counted(err, "quantizing to NF4", "layers"), err


def test_loading_a_folder_as_nf4_counts_its_layers(tiny_folder, capsys, slow):  # noqa: F811
    """load_base(folder, quantize="nf4") (train --quantize nf4, lorakit quantize) reads and quantizes layer by
    layer: counted. The tiny folder's Llama has 2 blocks: 14 linear layers, and its head (kept dense: counted too)."""
    from lorakit.models.quantized_loading import load_quantized

    model = load_quantized(tiny_folder, device="cpu")
    err = capsys.readouterr().err
    seen = _counted(err, "quantizing to NF4", "layers")
    assert seen and seen[-1] == (15, 15) and all(total == 15 for _, total in seen), err
    assert sum(type(m).__name__ == "NF4Linear" for m in model.modules()) == 14


def test_merging_counts_the_check_and_the_merge(capsys, slow):
    import lorakit

    model = _lora_llama()
    lorakit.merge(model)
    err = capsys.readouterr().err
    assert _counted(err, "checking the merge of default", "layers")[-1] == (4, 4), err  # q and v of 2 blocks
    assert _counted(err, "merging default", "layers")[-1] == (4, 4), err
    assert err.index("checking the merge") < err.index("merging default")


def test_export_merged_counts_the_cast_and_the_gguf(tmp_path, capsys, slow):
    """`lorakit merge --gguf f16`: the measure of what the cast keeps, the merge and the GGUF's tensors, each
    counted; the files are written as before."""
    from lorakit.export import export_merged
    from test_gguf_architectures import qwen_tokenizer  # GGUF export takes BPE tokenizers

    tokenizer = qwen_tokenizer()
    model = _lora_llama(vocab_size=len(tokenizer))
    out, report = export_merged(model, tokenizer, "default", tmp_path / "merged", gguf_type="f16")
    err = capsys.readouterr().err
    assert report.layers == 4
    assert _counted(err, "measuring the cast to float32", "weights")[-1] == (4, 4), err
    assert _counted(err, "merging default", "layers")[-1] == (4, 4), err
    written = _counted(err, "writing merged-f16.gguf", "tensors")
    assert written and written[-1][0] == written[-1][1] >= 2 * 9, err  # 9 tensors a block, and more
    assert (out / "merged-f16.gguf").is_file() and (out / "config.json").is_file()


def test_combining_counts_its_layers(capsys, slow):
    import lorakit

    model = _lora_llama("a", "b")
    lorakit.combine_adapters(model, ["a", "b"], name="ab", method="ties_svd", density=0.5)
    err = capsys.readouterr().err
    seen = _counted(err, "combining into ab", "layers")
    assert seen and seen[-1] == (4, 4), err


def test_writing_4bit_shards_counts_megabytes_in_a_log(tmp_path, capsys, monkeypatch):
    """`lorakit quantize ... > log`: the shards' bar was drawn on a terminal only, and a log got nothing; now plain
    lines counting megabytes (gigabytes from 1 GB) up to the total. progress=False stays silent."""
    from lorakit.models import quantized_saving

    monkeypatch.setattr(quantized_saving, "WRITE_PROGRESS_DELAY_S", 0.0)
    state = {f"w{i}": torch.ones(256, 1024) for i in range(10)}  # 1.0 MB each (float32)
    assert quantized_saving._write_weights(state, tmp_path, "5GB", progress=False) == 10 * 2**20
    assert capsys.readouterr().err == ""
    quantized_saving._write_weights(state, tmp_path, "5GB", progress=True)
    err = capsys.readouterr().err
    seen = re.findall(r"^writing 4-bit shards: (\d+\.\d)/10\.5 MB, \d:\d\d:\d\d elapsed, \d:\d\d:\d\d left$", err, re.M)
    assert "\r" not in err and seen[0] == "1.0" and seen[-1] == "10.5" and len(seen) == 10, err
    assert (tmp_path / "model.safetensors").is_file()


def test_loading_a_dense_folder_counts_its_tensors(tiny_folder, capsys, slow):  # noqa: F811
    """load_base of a dense folder (every command's model) read a 7B's weights in silence (transformers' own bar is
    muted): its tensor loop is counted now (transformers 5.x, which has one loop; 4.x loads as before), and
    transformers' own tqdm is put back afterwards."""
    from lorakit.models import load_base

    try:
        import transformers.core_model_loading as loading_module
    except ImportError:
        pytest.skip("this transformers has no single weight-loading loop (4.x)")
    own = loading_module.tqdm
    model, _ = load_base(str(tiny_folder), device="cpu")
    err = capsys.readouterr().err
    seen = _counted(err, f"loading {tiny_folder.name}", "tensors")
    tensors = len(model.state_dict())  # 21: embedding, 2 x 9 of the blocks, final norm, head
    assert seen and seen[-1] == (seen[-1][1], seen[-1][1]) and tensors - 2 <= seen[-1][1] <= tensors, err
    assert "Loading weights" not in err and "\r" not in err, err
    assert loading_module.tqdm is own
