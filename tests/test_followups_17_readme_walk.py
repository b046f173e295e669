"""Session 17's README passages, walked as a new user runs them (real processes and sockets, tiny random models).

What the walk checked, and what is kept checked here (the rest is covered by tests/test_followups_17_*.py):

* ``lorakit train`` stopped from outside by SIGTERM (``kill PID``, a scheduler): it ends with 143 and prints the line
  the README shows, whose ``lorakit train --resume ...`` names the run, its latest checkpoint the step it stopped.
* ``GET /metrics``: every metric name the README lists (``vllm:...``, ``lorakit_...``, the short ``/ _waiting``
  forms too) and the labels it names are in a real scrape of a static-decoder server with an adapter; the README's
  ``curl ... | grep generation_tokens_total`` comment has the scrape's label order; ``/health`` has the two prefix
  cache counts the README names, with hits on a repeated system prompt.
* The README's ``allowed_tools`` + ``thinking_token_budget`` client example, run as written (its base_url and model
  pointed at a scripted tool-calling model), prints the allowed tool's name.
* ``lorakit serve --help`` explains ``--prefix-cache-tokens`` as the README does (its default and 0 for off).

Found on the walk and fixed in README.md: the stop passage said "one line" (now shows the line itself), said nothing
of a background run (``cmd &`` from a script ignores SIGINT, so ``kill -INT`` did nothing: ``kill PID`` works);
``lorakit_lora_requests_*`` sat in the bullet of vLLM's names; allowed_tools had a JSON shape in the prose and no
example; ``cache_salt`` had no example; vision-language folders built as their text model were not mentioned.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import tiny_llama
from test_followups_17_protocol import server  # noqa: F401 - the scripted tool-calling server (a fixture)
from test_serve_support import ServerProcess, make_adapter, make_tokenizer
from test_train_helpers import REPO, make_model_folder, task_records, write_jsonl

README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}

# `lorakit train` whose steps take 50 ms more each (a tiny model trains ~40 steps/s: the signal must land mid-run)
SLOWED = """
import sys, time
from lorakit.train import loop
real = loop.accumulate_gradients
def slowed(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)
loop.accumulate_gradients = slowed
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _block(language: str, containing: str) -> str:
    [body] = [body for lang, body in FENCE.findall(README) if lang == language and containing in body]
    return body


# -- training stopped from outside ----------------------------------------------------------------------------------
def test_sigterm_from_outside_prints_the_readme_line_and_saves_the_step_it_names(tmp_path):
    make_model_folder(tmp_path / "tiny")
    write_jsonl(tmp_path / "train.jsonl", task_records(64, seed=1))
    steps = 60
    process = subprocess.Popen([sys.executable, "-c", SLOWED, "train", "--model", "./tiny", "--data", "train.jsonl",
                                "--out", "runs/mine", "--max-steps", str(steps), "--batch-size", "2",
                                "--no-progress"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = tmp_path / "runs" / "mine" / "metrics.jsonl", time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1][-3000:]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]  # as the README says: 143 for SIGTERM

    shown = _block("text", "training stopped by").strip()  # the README's sample line, its numbers any numbers
    pattern = re.escape(shown)
    for number in sorted(set(re.findall(r"\d+", shown)), key=len, reverse=True):
        pattern = pattern.replace(number, r"\d+")
    said = [line for line in err.splitlines() if line.startswith("training stopped by")]
    assert len(said) == 1 and re.fullmatch(pattern, said[0]), (shown, err[-2000:])
    step = int(re.search(r"at step (\d+) of", said[0]).group(1))
    assert 0 < step < steps and (tmp_path / "runs/mine/checkpoints" / f"step-{step:06d}").is_dir()

    # the command to paste names this run (tests/test_followups_17_stop.py runs such a resume to the end)
    command = said[0].split("continue with: ", 1)[1].split()
    assert command == ["lorakit", "train", "--resume", "runs/mine"]
    latest = (tmp_path / "runs/mine/checkpoints/latest").read_text().strip()
    assert latest == f"step-{step:06d}", latest


# -- /metrics and /health -----------------------------------------------------------------------------------------
def _readme_metric_names() -> list[tuple[str, list[str]]]:
    """(name, labels) for each metric the README's /metrics passage lists; ``/ `_waiting``` spans are returned as
    ``_waiting`` after the full name they shorten."""
    start = README.index("`GET /metrics` is Prometheus text")
    passage = README[start:README.index("need no API key", start)]
    found = []
    for span in re.findall(r"`([^`\n]+)`", passage):
        match = re.fullmatch(r"((?:vllm:|lorakit_)[a-z_:]+|_[a-z_]+)(?:\{([^}]*)\})?", span)
        if match:
            labels = [label.strip() for label in (match.group(2) or "").split(",") if label.strip()]
            found.append((match.group(1), labels))
    return found


def _scraped(text: str) -> dict[str, set[str]]:
    """metric family -> label names seen on its samples."""
    families: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()
        name = re.sub(r"_(bucket|sum|count)$", "", name)
        families.setdefault(name, set()).update(re.findall(r"([a-zA-Z_]+)=\"", line))
    return families


@pytest.fixture(scope="module", autouse=True)
def static_server(tmp_path_factory):
    """A static-decoder server with the adapter "orders", started in a thread as the module begins (it starts while
    the SIGTERM test trains: the file stays well within its time on a busy machine)."""
    root = tmp_path_factory.mktemp("walk17-serve")
    tokenizer = make_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    make_adapter(model, root / "adapters" / "orders", seed=1)
    started: dict = {}

    def start() -> None:
        try:
            started["proc"] = ServerProcess(root / "model", root / "adapters", "--decoder", "static",
                                            "--max-context", "256", "--max-batch", "2", log=root / "server.log")
        except Exception as error:  # noqa: BLE001 - raised by the test that needs the server
            started["error"] = error

    thread = threading.Thread(target=start)
    thread.start()

    def client() -> httpx.Client:
        thread.join()
        if "error" in started:
            raise started["error"]
        return httpx.Client(base_url=started["proc"].url, timeout=120)

    try:
        yield client
    finally:
        thread.join()
        if "proc" in started:
            started["proc"].stop()


def test_every_metric_the_readme_lists_is_in_a_real_scrape(static_server):
    with static_server() as client:
        _check_scrape(client)


def _check_scrape(static_server: httpx.Client) -> None:
    system = {"role": "system", "content": "Extract the order as JSON, in a few words and no more. " * 3}
    for model in ("orders", "orders", "base"):  # the second re-sends the first's prompt: prefix-cache hits
        reply = static_server.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 4, "temperature": 0,
            "messages": [system, {"role": "user", "content": "Two lattes to Berlin"}]})
        assert reply.status_code == 200, reply.text
    assert static_server.get("/no/such/path").status_code == 404
    health = static_server.get("/health").json()
    assert health["decoder"] == "static"
    assert 0 < health["prefix_cache_hit_tokens"] <= health["prefix_cache_query_tokens"], health
    text = static_server.get("/metrics").text
    families = _scraped(text)

    listed = _readme_metric_names()
    assert len(listed) >= 20, listed
    previous = None
    for name, labels in listed:
        if name.startswith("_"):  # `lorakit_requests_running` / `_waiting`: the previous name, its end replaced
            assert previous, name
            cuts = [i for i, c in enumerate(previous) if c == "_" and i > 0]
            candidates = [previous[:i] + name for i in cuts]
            assert any(c in families for c in candidates), f"README's `{name}` after `{previous}`: none of {candidates}"
            continue
        assert name in families, f"README lists `{name}`, which /metrics does not write"
        assert set(labels) <= families[name], (name, labels, families[name])
        previous = name
    for name in ("vllm:request_success_total", "vllm:generation_tokens_total", "lorakit_lora_requests_running"):
        assert "lora_name" in families[name], name
    assert 'route="unmatched"' in text
    # the README's `curl ... | grep generation_tokens_total` comment: model_name, then lora_name
    comment = re.search(r"grep generation_tokens_total +# \.\.\.(\{[^}]*\})", README).group(1)
    order = re.findall(r"(\w+)=", comment)
    assert re.search(r'^vllm:generation_tokens_total\{model_name="base",lora_name="orders"\} \d+$', text, re.M), text
    assert order == ["model_name", "lora_name"]


def test_serve_help_explains_prefix_cache_tokens_as_the_readme():
    out = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--help"], env={**ENV, "COLUMNS": "200"},
                         capture_output=True, text=True, timeout=120).stdout
    help_text = " ".join(out.split("--prefix-cache-tokens N", 2)[2].split("--", 1)[0].split())
    assert "static decoder" in help_text and "a quarter of the KV cache" in help_text and "0: off" in help_text
    readme = " ".join(README.split())
    assert "`--prefix-cache-tokens` sizes the pool, in tokens (default: a quarter of the KV cache" in readme
    assert "0 turns it off" in readme


# -- the allowed_tools example ----------------------------------------------------------------------------------------
def test_the_readme_allowed_tools_example_calls_the_allowed_tool(server):  # noqa: F811
    source = _block("python", "allowed_tools")
    assert source.count('base_url="http://localhost:8000/v1"') == 1 and source.count('model="agent"') == 1
    runnable = (source.replace("http://localhost:8000/v1", server["url"] + "/v1").replace('model="agent"', 'model="base"')
                .replace("max_tokens=256", "max_tokens=24"))  # the scripted server's --max-tokens is 32
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(runnable, "README.md allowed_tools block", "exec"), {})
    assert printed.getvalue().split() == ["get_time"]  # the scripted model calls get_weather when free to
