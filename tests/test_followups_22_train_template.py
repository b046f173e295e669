"""An adapter trained in Alpaca's (or the question/answer) prompt format keeps it when copied out of its run
(twenty-second follow-up).

``lorakit train`` on Alpaca or question/answer records with a tokenizer that has no chat template trains them in
their prompt format and records it in results.json, where ``lorakit generate / merge / serve`` find it. An adapter
folder copied out of its run (``cp -r RUN/adapter adapters/x``, as serve's own hint suggests) lost it, and a
``--full`` run's RUN/model was saved with a tokenizer without a template (serving it refused chats). Now the run
saves the tokenizer, given a chat template in that format (``lorakit.train.formats.with_frame_template``), into
every adapter folder it writes (RUN/adapter, RUN/best, each checkpoint's adapter) and into RUN/model, as
transformers' Trainer and trl save a tokenizer beside an adapter; other runs save no tokenizer where none was.
Each test fails on the code before the change. Tiny random Llamas and BPE tokenizers throughout.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import httpx
import pytest

from lorakit.cli import main
from test_followups_22_format import SYSTEM, _ask, _records, _trained_prompt_ids
from test_serve_support import ServerProcess, tiny_hf_folder
from test_train_helpers import write_jsonl

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _bare_base(folder: Path) -> Path:
    """A tiny Llama folder whose tokenizer has no chat template."""
    base = tiny_hf_folder(folder, max_position_embeddings=512)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    return base


def _train(base: Path, records: list[dict], out: Path, *extra: str) -> Path:
    data = write_jsonl(out.with_suffix(".jsonl"), records)
    rank = [] if "--full" in extra else ["--rank", "2"]
    code = main(["train", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "2", *rank,
                 "--batch-size", "4", "--eval-examples", "0", "--no-progress", *extra])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Runs on a base without a chat template: Alpaca (with validation: RUN/best, and a checkpoint per step),
    question/answer, a --full Alpaca run, prompt/completion records; and Alpaca records on a base with one."""
    root = tmp_path_factory.mktemp("f22t")
    base = _bare_base(root / "base")
    out = {"base": base, "templated": tiny_hf_folder(root / "templated", max_position_embeddings=512)}
    held_out = write_jsonl(root / "val.jsonl", _records("alpaca")[:2])
    out["alpaca"] = _train(base, _records("alpaca"), root / "alpaca", "--val-data", str(held_out), "--eval-every",
                           "1", "--save-every", "1")
    out["question"] = _train(base, _records("question"), root / "question")
    out["full"] = _train(base, _records("alpaca"), root / "full", "--full")
    out["plain"] = _train(base, [{"prompt": f"Q{i}: ", "completion": f"A{i}"} for i in range(4)], root / "plain")
    out["chat"] = _train(out["templated"], _records("alpaca"), root / "chat")
    for kind in ("alpaca", "question", "full"):
        assert json.loads((out[kind] / "results.json").read_text())["prompt_format"] == kind.replace("full", "alpaca")
    return out


def _framed_ids(folder: Path, record: dict) -> list[int]:
    """The ids transformers alone renders from ``folder``'s tokenizer for the record's question."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template, sorted(p.name for p in folder.iterdir())
    return list(tokenizer.apply_chat_template([{"role": "user", "content": _ask(record)}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


@pytest.mark.parametrize("kind", ["alpaca", "question"])
def test_every_adapter_folder_of_the_run_carries_the_prompt_format(kind, runs):
    """RUN/adapter, RUN/best and every checkpoint's adapter folder hold the tokenizer with the frame template
    (the run's system text in it): transformers alone renders a question as training's prompt ids. peft still
    loads the folder, the adapter files are those of before (only tokenizer files added), no temporary folder
    is left."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs[kind]
    folders = [run / "adapter"]
    if kind == "alpaca":
        folders += [run / "best", *sorted((run / "checkpoints").glob("step-*/adapter"))]
        assert len(folders) == 4, folders
    base = AutoTokenizer.from_pretrained(runs["base"])
    for folder in folders:
        names = set(_sizes(folder))
        assert ADAPTER_FILES <= names and names - ADAPTER_FILES <= TOKENIZER_FILES, names
        assert "chat_template.jinja" in names or "chat_template" in json.loads((folder / "tokenizer_config.json")
                                                                                  .read_text())
        for record in _records(kind):
            assert _framed_ids(folder, record) == _trained_prompt_ids(record, base), folder
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], list(folder.parent.iterdir())
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), str(run / "adapter"))
    # the adapter's own files weigh what they did: compare with a run that saves no tokenizer (same shapes)
    plain = _sizes(runs["plain"] / "adapter")
    assert set(plain) == ADAPTER_FILES, plain
    assert {name: size for name, size in _sizes(run / "adapter").items() if name in ADAPTER_FILES}["adapter_model"
                                                                                                  ".safetensors"] \
        == plain["adapter_model.safetensors"]


def test_other_runs_save_no_tokenizer_and_full_runs_a_framed_one(runs):
    """Prompt/completion records, and Alpaca records on a tokenizer with a chat template (trained as chats), leave
    the adapter folder as before: no tokenizer files. A --full run's RUN/model tokenizer gets the template."""
    from transformers import AutoTokenizer

    for kind in ("plain", "chat"):
        assert set(_sizes(runs[kind] / "adapter")) == ADAPTER_FILES, kind
    assert json.loads((runs["chat"] / "results.json").read_text())["prompt_format"] == "chat"
    base = AutoTokenizer.from_pretrained(runs["base"])
    for record in _records("alpaca"):
        assert _framed_ids(runs["full"] / "model", record) == _trained_prompt_ids(record, base)


def _generated_ids(monkeypatch, argv: list[str]) -> list[int]:
    """The prompt ids ``lorakit generate ARGV`` hands to the model (lorakit.generation.generate's first row)."""
    import lorakit.generation

    seen: list[list[int]] = []
    real = lorakit.generation.generate

    def spy(model, prompts, *args, **kwargs):
        seen.append(list(prompts[0]))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(lorakit.generation, "generate", spy)
    assert main(["generate", *argv, "--max-new-tokens", "1"]) == 0
    assert len(seen) == 1
    return seen[0]


def test_generate_frames_once_in_the_run_and_out_of_it(runs, tmp_path, monkeypatch, capsys):
    """`lorakit generate` asks with training's prompt ids, framed exactly once, whether the format comes from the
    run's results.json (RUN/adapter: framed as text, the template not applied on top) or from the saved template
    (a copy of the adapter, of RUN/model); --system replaces the run's system text either way."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(runs["base"])
    record = _records("alpaca")[1]
    want = _trained_prompt_ids(record, base)
    other = _trained_prompt_ids({**record, "system": "Be short."}, base)
    shutil.copytree(runs["alpaca"] / "adapter", tmp_path / "copied")
    shutil.copytree(runs["full"] / "model", tmp_path / "model")
    for adapter in (runs["alpaca"] / "adapter", tmp_path / "copied"):
        argv = ["--model", str(runs["base"]), "--adapter", str(adapter), _ask(record)]
        assert _generated_ids(monkeypatch, argv) == want, adapter
        assert _generated_ids(monkeypatch, [*argv, "--system", "Be short."]) == other, adapter
    for model in (runs["full"] / "model", tmp_path / "model"):
        assert _generated_ids(monkeypatch, ["--model", str(model), _ask(record)]) == want, model
    capsys.readouterr()


def test_merge_of_a_copied_adapter_keeps_the_prompt_format(runs, tmp_path, capsys):
    """`lorakit merge --adapter COPY` (no results.json beside it) writes a tokenizer that renders a question as
    training did; before, the copy merged into a folder without a chat template."""
    from transformers import AutoTokenizer

    shutil.copytree(runs["question"] / "adapter", tmp_path / "copied")
    assert main(["merge", "--model", str(runs["base"]), "--adapter", str(tmp_path / "copied"),
                 "--out", str(tmp_path / "merged")]) == 0
    base = AutoTokenizer.from_pretrained(runs["base"])
    for record in _records("question"):
        assert _framed_ids(tmp_path / "merged", record) == _trained_prompt_ids(record, base)
    capsys.readouterr()


def test_serve_renders_a_copied_adapters_chats_in_its_prompt_format(runs, tmp_path):
    """`lorakit serve --adapters DIR` with a copy of the run's adapter: its chats are rendered with its own
    tokenizer, as training's prompts (a system turn replacing the run's text); /v1/models says so. Before, a
    400 ('this tokenizer has no chat template')."""
    from transformers import AutoTokenizer

    shutil.copytree(runs["alpaca"] / "adapter", tmp_path / "adapters" / "x")
    base = AutoTokenizer.from_pretrained(runs["base"])
    record = _records("alpaca")[2]
    server = ServerProcess(runs["base"], tmp_path / "adapters", "--max-tokens", "4", log=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for messages, said in (([{"role": "user", "content": _ask(record)}], record),
                                   ([{"role": "system", "content": "Be short."},
                                     {"role": "user", "content": _ask(record)}], {**record, "system": "Be short."})):
                answer = client.post("/v1/chat/completions", json={
                    "model": "x", "messages": messages, "max_tokens": 1, "temperature": 0, "return_token_ids": True})
                assert answer.status_code == 200, answer.text
                assert answer.json()["prompt_token_ids"] == _trained_prompt_ids(said, base)
            listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            assert listed["x"]["tokenizer"] == "adapter", listed
    finally:
        server.stop()


def test_records_on_a_framed_tokenizer_take_the_prompt_format_itself(runs):
    """A tokenizer carrying the frame template (an adapter folder's, which lorakit eval and a second lorakit train
    use) renders Alpaca / question records as the bare tokenizer did, "### Input:" and "Context:" included, not as
    chats through the template (other text, other ids); `lorakit eval` of the run's adapter is unchanged."""
    import copy

    from transformers import AutoTokenizer

    from lorakit.train.data import render
    from lorakit.train.formats import with_frame_template

    bare = AutoTokenizer.from_pretrained(runs["base"])
    records = [{"instruction": "Name it.", "input": "a red fruit", "output": "Apple.", "system": SYSTEM},
               {"question": "Which?", "context": "Two roads.", "answer": "Left."}]
    for record in records:
        kind = "alpaca" if "instruction" in record else "question"
        framed = with_frame_template(copy.deepcopy(bare), kind, SYSTEM)
        assert render(record, framed) == render(record, bare), record


def test_a_failed_tokenizer_write_keeps_the_previous_adapter(runs, tmp_path):
    """The tokenizer is written inside the adapter's temporary folder: a write that fails (a full disk) leaves the
    previous adapter folder whole, and no temporary folder behind."""
    import torch

    from lorakit.errors import LorakitError
    from lorakit.train.loop import save_result

    folder = tmp_path / "run" / "adapter"
    shutil.copytree(runs["alpaca"] / "adapter", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class Full:
        def save_pretrained(self, path):
            raise OSError(errno.ENOSPC, "No space left on device")

    import lorakit

    model = lorakit.load_base(str(runs["base"]), dtype="float32", device="cpu")[0]
    lorakit.load_adapter(model, lorakit.read_adapter(str(folder)), adapter="default")
    with torch.no_grad(), pytest.raises(LorakitError, match="writing .*adapter failed"):
        save_result(model, Full(), folder, "default")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]


def test_generate_with_an_empty_system_drops_the_runs_system_text_in_and_out_of_the_run(runs, tmp_path, monkeypatch,
                                                                                        capsys):
    """--system '' leaves the run's system text out, also for a copied adapter whose saved template would write it
    by default (the frame leaves it out for an empty system turn, which generate now sends)."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(runs["base"])
    record = _records("alpaca")[1]
    bare = _trained_prompt_ids({k: v for k, v in record.items() if k != "system"}, base)
    assert bare != _trained_prompt_ids(record, base)
    shutil.copytree(runs["alpaca"] / "adapter", tmp_path / "copied")
    for adapter in (runs["alpaca"] / "adapter", tmp_path / "copied"):
        argv = ["--model", str(runs["base"]), "--adapter", str(adapter), _ask(record), "--system", ""]
        assert _generated_ids(monkeypatch, argv) == bare, adapter
    capsys.readouterr()
