"""What a new user met walking through the README, kept fixed.

* ``lorakit train`` (``make demo``) scored the held-out examples before training silently: on a busy 2-core
  machine the 60 greedy generations took minutes after the "validation data" line with no word of what was
  running. The run now says what it is scoring, before and after training.
"""

from __future__ import annotations

from lorakit.cli import main
from test_train_helpers import tiny_data, tiny_folder  # noqa: F401 (fixtures)


def test_train_announces_the_exact_match_scoring_before_it_runs(tmp_path, tiny_folder, tiny_data, capsys):
    train_path, val_path = tiny_data
    code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--val-data", str(val_path),
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--rank", "4", "--batch-size", "4",
                 "--no-progress", "--eval-examples", "2", "--max-new-tokens", "4", "--samples", "0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = printed.splitlines()

    def index(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line]
        assert found, f"no line with {text!r} in:\n{printed}"
        return found[0]

    announce_before = index("before training: scoring 2 held-out examples by exact match")
    assert announce_before < index("before training (2 held-out examples): exact match")
    announce_after = index("after training: scoring 2 held-out examples by exact match")
    assert announce_before < announce_after < index("held-out exact match:")


def test_combine_help_description_is_wrapped(capsys):
    """``lorakit combine --help`` printed its description as one 240-character line (a raw formatter)."""
    import pytest

    with pytest.raises(SystemExit):
        main(["combine", "--help"])
    text = capsys.readouterr().out
    assert "add_weighted_adapter" in text
    assert max(len(line) for line in text.splitlines()) <= 120, text


def test_qlora_run_says_its_base_is_4_bit(tmp_path, tiny_folder, tiny_data, capsys):
    """``lorakit train --quantize nf4`` announced "lora of MODEL on cpu", with no word that the base was 4-bit."""
    train_path, _ = tiny_data
    code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--quantize", "nf4",
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--rank", "4", "--batch-size", "4",
                 "--no-progress", "--eval-examples", "0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "lorakit train: lora of " in printed and "(NF4 4-bit base: QLoRA) on cpu" in printed.splitlines()[0]
