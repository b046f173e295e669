"""Follow-ups of the twenty-second session (lead): the merge command's loading hint on transformers 4.x."""

from types import SimpleNamespace

import pytest
import transformers

from lorakit.commands.merge import _attention_hint


def _model(config):
    return SimpleNamespace(config=config)


@pytest.mark.parametrize("version, softcapped, expected", [
    ("4.56.2", True, ', attn_implementation="eager"'),  # 4.x sdpa drops Gemma 2's soft-capping: say eager
    ("4.56.2", False, ""),
    ("5.24.0", True, ""),  # transformers 5 chooses eager for soft-capped attention itself
])
def test_merge_hint_names_eager_attention_for_a_soft_capped_model_on_transformers_4(monkeypatch, version, softcapped,
                                                                                     expected):
    monkeypatch.setattr(transformers, "__version__", version)
    config = (transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8)
              if softcapped else transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                          num_hidden_layers=1, num_attention_heads=2))
    assert _attention_hint(_model(config)) == expected


@pytest.mark.parametrize("command, required", [("serve", "--adapters DIR"), ("merge", "--adapter ADAPTER")])
def test_help_usage_shows_required_options_without_brackets(capsys, command, required):
    from lorakit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert f" {required}" in usage and f"[{required}]" not in usage


def test_a_training_run_gives_transformers_bars_back_as_it_found_them(tmp_path):
    """lorakit train turns transformers' loading bars off while it prints its own progress; from Python (a notebook
    that goes on loading models) they were left off for the rest of the process."""
    from transformers.utils import logging as hf_logging

    from lorakit.cli import main
    from test_serve_support import tiny_hf_folder
    from test_train_helpers import write_jsonl

    base = tiny_hf_folder(tmp_path / "base", max_position_embeddings=512)
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"Q{i}: ", "completion": f"A{i}"} for i in range(4)])
    for was_on in (True, False):
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
        try:
            assert main(["train", "--model", str(base), "--data", str(data), "--out", str(tmp_path / f"run{was_on}"),
                         "--max-steps", "1", "--rank", "2", "--batch-size", "4", "--eval-examples", "0",
                         "--no-progress"]) == 0
            assert hf_logging.is_progress_bar_enabled() is was_on
        finally:
            hf_logging.enable_progress_bar()
