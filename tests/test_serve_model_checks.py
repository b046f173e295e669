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


def test_folders_without_an_adapter_config_are_not_offered(tmp_path, capsys):
    # `--adapters runs/mine`: a training run's folder holds adapter/ and best/ beside checkpoints/ and logs
    from lorakit.serve.paths import list_adapter_names
    from test_serve_support import make_adapter

    import lorakit

    folder = tiny_hf_folder(tmp_path / "model")
    model, _ = lorakit.load_base(str(folder))
    run = tmp_path / "adapters"
    make_adapter(model, run / "adapter", seed=1)
    make_adapter(model, run / "best", seed=2)
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "logs").mkdir()
    assert list_adapter_names(run) == ["adapter", "best"]
    state = _state(folder, tmp_path)
    try:
        out = capsys.readouterr().out
        assert f"folder 'checkpoints' in {run} is not served: it holds no adapter_config.json" in out
        assert f"folder 'logs' in {run} is not served" in out
        assert state.pool.available() == ["adapter", "best"]
    finally:
        state.engine.close()
    import httpx

    from test_serve_support import ServerProcess

    server = ServerProcess(folder, run, "--decoder", "transformers")  # over a real socket, as a client sees it
    try:
        listed = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in listed] == ["base", "adapter", "best"]
        assert httpx.get(server.url + "/v1/models/best", timeout=30).status_code == 200
        missing = httpx.get(server.url + "/v1/models/checkpoints", timeout=30)
        assert missing.status_code == 404 and "holds no adapter_config.json" in missing.json()["error"]["message"]
    finally:
        server.stop()
