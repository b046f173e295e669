"""Session 24, serve_ops: running ``lorakit serve`` as an operator, over real sockets.

- ``--port 0`` (a free port the system picks) named no port at all at the default log level: the start line said
  ``http://127.0.0.1:0`` and uvicorn's "running on" line is an info line; the server now says where it listens;
- ``--max-adapter-mb inf`` passed the flag checks and died with an OverflowError traceback after the model loaded;
- ``POST /v1/load_lora_adapter`` with a ``lora_path`` that is a file (adapter_config.json itself) was told
  "no such folder", as if nothing were there.
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server started with ``--port 0``: its URL is read from what it prints, as an operator would."""
    import httpx
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ops")
    model = tiny_hf_folder(root / "model")
    make_adapter(AutoModelForCausalLM.from_pretrained(model), root / "adapters" / "alpha", seed=1)
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--adapters",
                                str(root / "adapters"), "--port", "0", "--name", "base"], env=ENV, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
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


@pytest.mark.parametrize("value", ["inf"])
def test_max_adapter_mb_must_be_finite(server, value):
    # a real model folder: the flag passed every check before, and the model loaded before the traceback
    run = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--model", str(server["root"] / "model"),
                          "--adapters", str(server["root"] / "adapters"), "--port", "0", "--max-adapter-mb", value], env=ENV, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("lorakit serve: error: --max-adapter-mb must be a positive")
