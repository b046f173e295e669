"""What ``lorakit serve`` reads from the model folder before it serves: the end tokens of the folder's
generation_config (what transformers' generate stops on, e.g. Llama 3.1's <|eom_id|>) besides the tokenizer's, and
a model that lorakit's generation cannot run is refused at startup in one line, not on every request."""

from __future__ import annotations

import argparse
import json

import pytest

from lorakit.errors import LorakitError
from test_serve_support import tiny_hf_folder


def _state(folder, tmp_path):
    from lorakit.serve.cli import add_arguments, build_state

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (tmp_path / "adapters").mkdir(exist_ok=True)
    return build_state(parser.parse_args(["--model", str(folder), "--adapters", str(tmp_path / "adapters"),
                                          "--decoder", "transformers"]))


def test_generation_config_end_tokens_stop_served_answers(tmp_path):
    folder = tiny_hf_folder(tmp_path / "model")
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], 17]  # a second end token the tokenizer does not call an end
    (folder / "generation_config.json").write_text(json.dumps(config))
    state = _state(folder, tmp_path)
    try:
        assert 17 in state.stop_token_ids and config["eos_token_id"][0] in state.stop_token_ids
    finally:
        state.engine.close()


def test_a_model_generation_cannot_run_is_refused_at_startup(tmp_path, monkeypatch):
    import lorakit.generation

    folder = tiny_hf_folder(tmp_path / "model")
    monkeypatch.setattr(lorakit.generation, "unsupported", lambda model: "this family keeps its state in its layers")
    with pytest.raises(LorakitError, match="^lorakit serve cannot run this model: this family keeps its state"):
        _state(folder, tmp_path)
