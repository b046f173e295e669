"""Session 24, serve_ops: running ``lorakit serve`` as an operator, over real sockets.

- ``--port 0`` (a free port the system picks) named no port at all at the default log level: the start line said
  ``http://127.0.0.1:0`` and uvicorn's "running on" line is an info line; the server now says where it listens;
- ``--max-adapter-mb inf`` passed the flag checks and died with an OverflowError traceback after the model loaded;
- ``POST /v1/load_lora_adapter`` with a ``lora_path`` that is a file (adapter_config.json itself) was told
  "no such folder", as if nothing were there;
- a server whose log pipe had closed (``lorakit serve ... | tee log``, tee gone) lost its engine thread at the
  first failed batch (printing its traceback raised BrokenPipeError inside the handler): every request after waited
  for good, while /health said "ok"; and an engine thread that ended for any reason left /health "ok" and every
  request waiting: it now fails them and /health, /ping answer 503; and a bug's 500 on that server came as
  Starlette's plain-text "Internal Server Error" (printing its trace raised), not the OpenAI error body;
- --preload tried the first --max-loaded names, refused ones too, leaving their slots empty.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_serve_support import make_adapter, tiny_hf_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "LORAKIT_DISABLE_TRITON": "1", "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
POISON = "word " * 30  # a prompt the planted hook fails the batch of (40 tokens or more)
# a batch holding a prompt of 40 tokens or more fails, as an out-of-memory would (the engine fails that batch)
_HOOK = '''
import lorakit.serve.engine as engine

_step = engine.Engine._step


def _planted(self, newcomers, done):
    if any(len(r.prompt) >= 40 for r in newcomers):
        raise RuntimeError("a failed batch planted by test_followups_24_serve_ops")
    return _step(self, newcomers, done)


engine.Engine._step = _planted

import lorakit.serve.app as app


def _broken(state, names):  # GET /v1/models: a bug's 500
    raise RuntimeError("a bug planted by test_followups_24_serve_ops")


app._own_tokenizers = _broken
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server started with ``--port 0``: its URL is read from what it prints, as an operator would; then its
    output pipe is closed (the log reader gone), and a batch with a ``POISON`` prompt fails (``_HOOK``)."""
    import httpx
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ops")
    model = tiny_hf_folder(root / "model")
    make_adapter(AutoModelForCausalLM.from_pretrained(model), root / "adapters" / "alpha", seed=1)
    (root / "hooks").mkdir()
    (root / "hooks" / "sitecustomize.py").write_text(_HOOK)
    path = os.pathsep.join(filter(None, [str(root / "hooks"), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--adapters",
                                str(root / "adapters"), "--port", "0", "--name", "base"], env={**ENV, "PYTHONPATH": path},
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:  # up to the line that names the port, then the pipe is closed: nobody reads the log
        for line in process.stdout:
            lines.put(line)
            if "listening on" in line:
                break
        process.stdout.close()

    threading.Thread(target=read, daemon=True).start()
    seen, url = [], None
    deadline = time.monotonic() + 90
    try:
        while url is None and time.monotonic() < deadline and process.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
            if match and int(match.group(2)) != 0:
                url = match.group(1)
        assert url, f"the server never said its port: {''.join(seen)[-2000:]}"
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/health").status_code == 200
            yield {"client": client, "root": root, "seen": seen}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_port_zero_says_the_port_it_listens_on(server):
    # the fixture found the URL in the output and /health answered there
    assert any("--port 0" in line for line in server["seen"])
    # the start line before it does not give ":0" as an address
    assert not any("127.0.0.1:0 " in line for line in server["seen"]), server["seen"]


def test_a_lora_path_that_is_a_file_is_told_it_is_a_file(server):
    config = server["root"] / "adapters" / "alpha" / "adapter_config.json"
    answer = server["client"].post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(config)})
    assert answer.status_code == 404
    message = answer.json()["error"]["message"]
    assert "is a file, not a folder" in message and "no such folder" not in message
    # a path with nothing there is still told so, and the folder itself loads
    gone = server["client"].post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(config) + "x"})
    assert gone.status_code == 404 and "no such folder" in gone.json()["error"]["message"]
    loaded = server["client"].post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(config.parent)})
    assert loaded.status_code == 200, loaded.text


def test_the_adapters_folder_itself_as_lora_path_is_told_so(server):
    # it was a 403 saying the path is "outside the adapters folder"
    answer = server["client"].post("/v1/load_lora_adapter", json={"lora_name": "y",
                                                                  "lora_path": str(server["root"] / "adapters")})
    assert answer.status_code == 404, answer.text
    message = answer.json()["error"]["message"]
    assert "is the adapters folder itself" in message and "outside" not in message


@pytest.mark.parametrize("value", ["inf"])
def test_max_adapter_mb_must_be_finite(server, value):
    # a real model folder: the flag passed every check before, and the model loaded before the traceback
    run = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--model", str(server["root"] / "model"),
                          "--adapters", str(server["root"] / "adapters"), "--port", "0", "--max-adapter-mb", value], env=ENV, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("lorakit serve: error: --max-adapter-mb must be a positive")


def test_a_failed_batch_with_the_log_pipe_closed_leaves_the_server_serving(server):
    client = server["client"]
    failed = client.post("/v1/completions", json={"model": "base", "prompt": POISON, "max_tokens": 2}, timeout=20)
    assert failed.status_code == 500 and "planted" in failed.json()["error"]["message"]
    # before: printing the batch's traceback to the closed pipe ended the engine's thread, and this timed out
    answer = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}, timeout=20)
    assert answer.status_code == 200, answer.text
    assert client.get("/health").json()["status"] == "ok"


class _Planted(BaseException):
    """Not an Exception: what the loop's handler of a failed batch does not take (a bug of the loop's own)."""


def test_an_engine_whose_thread_ended_fails_its_jobs_and_health_says_so(monkeypatch):
    from conftest import tiny_llama

    from lorakit.generation import SamplingParams
    from lorakit.serve.app import health_answer
    from lorakit.serve.engine import Engine, Request

    def planted(self, newcomers, done):
        raise _Planted("the engine's own bug")

    monkeypatch.setattr(Engine, "_step", planted)
    engine = Engine(tiny_llama(), threading.RLock(), max_batch=2)
    try:
        reasons: queue.Queue = queue.Queue()

        def job() -> Request:
            return Request([1, 2, 3], None, SamplingParams(max_new_tokens=2), lambda token, info: True, reasons.put)

        engine.submit(job())  # its step ends the thread: it is failed, not left waiting
        assert "the engine stopped (_Planted: the engine's own bug)" in reasons.get(timeout=30)
        engine._thread.join(timeout=30)
        engine.submit(job())  # after: failed at once
        assert reasons.get(timeout=5).startswith("error: the engine stopped")
        answer = health_answer(type("State", (), {"engine": engine})())
        assert answer.status_code == 503 and b'"status":"error"' in answer.body
    finally:
        engine.close()


def test_preload_fills_the_slots_past_a_refused_adapter(tmp_path, capsys):
    import argparse

    from lorakit.serve.cli import add_arguments, build_state

    model = tiny_hf_folder(tmp_path / "model")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model)
    for name, seed in (("b-good", 1), ("c-good", 2)):
        make_adapter(base, tmp_path / "adapters" / name, seed=seed)
    broken = tmp_path / "adapters" / "a-broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 4,')  # first by name, and refused
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    state = build_state(parser.parse_args(["--model", str(model), "--adapters", str(tmp_path / "adapters"),
                                           "--decoder", "transformers", "--preload", "--max-loaded", "2"]))
    try:
        assert "skipped adapter 'a-broken'" in capsys.readouterr().out
        # before: the first 2 names were tried, a-broken and b-good, and one slot stayed empty
        assert sorted(a["name"] for a in state.pool.loaded()) == ["b-good", "c-good"]
    finally:
        state.engine.close()


def test_a_bugs_500_with_the_log_pipe_closed_is_still_answered(server):
    # before: printing the bug's trace to the closed pipe raised BrokenPipeError in the handler, and the connection
    # was dropped with no answer (httpx: "Server disconnected without sending a response")
    answer = server["client"].get("/v1/models")
    assert answer.status_code == 500 and answer.json()["error"]["message"] == "internal error: RuntimeError"
    assert server["client"].get("/health").status_code == 200
