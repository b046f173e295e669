"""Small follow-ups of the thirteenth audits: eval's --progress / --no-progress, one layout line for an FSDP run,
no missing-glyph warnings from a run report's plot, the wrong-base message naming the base once, wrongly typed
generation_config.json values warned of, and eval's run-folder data message naming the folder the run started in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_llama
from lorakit.cli import main
from test_serve_support import make_adapter
from test_train_helpers import make_model_folder, task_records, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, a second one of other shapes, training data, and an adapter made on the first."""
    root = tmp_path_factory.mktemp("small13")
    tiny = make_model_folder(root / "tiny")
    other = root / "other"  # hidden 48 instead of 32: no adapter of `tiny` fits it
    tiny_llama(vocab_size=32, hidden_size=48, intermediate_size=40, num_hidden_layers=2).save_pretrained(other)
    shutil.copy(tiny / "tokenizer.json", other)
    shutil.copy(tiny / "tokenizer_config.json", other)
    adapter = make_adapter(tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2),
                           root / "adapter", seed=1)
    return {"root": root, "tiny": tiny, "other": other, "adapter": adapter,
            "data": write_jsonl(root / "train.jsonl", task_records(8, seed=1))}


def _refused(capsys, argv: list[str]) -> str:
    """Run the CLI; it must refuse with exit 2 and one stderr line (no traceback). Returns that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "Writing model shards" not in line]
    assert len(lines) == 1, lines
    return lines[0]


# -- the wrong base -------------------------------------------------------------------------------------------------
def test_the_wrong_base_message_names_the_adapters_base_once(files, capsys, tmp_path):
    """'... (adapter_config.json names the base X); pass --model X, the base its adapter_config.json names' said
    the same thing twice in one line."""
    named = shutil.copytree(files["adapter"], tmp_path / "named")
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(files["tiny"])}))
    line = _refused(capsys, ["generate", "--model", files["other"], "--adapter", named, "Hello"])
    assert line.count("adapter_config.json names") == 1, line
    assert line.endswith(f"adapter_config.json names the base {str(files['tiny'])!r}); pass --model {files['tiny']}"), line
