"""Follow-ups of commit 33134e0 (an adapter's first-load checks run without the pool's lock): a reload's checks
run without it too, the pool's lock is one that a single release frees, and a 503 ``adapter_busy`` carries a
``Retry-After`` header. The pool is tested directly on a tiny random Llama, the server over a real socket.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
import torch

import lorakit
from lorakit.serve.pool import AdapterBusy, AdapterPool, AdapterRejected
from conftest import tiny_llama
from test_serve_support import ServerProcess, make_adapter, never_ending, tiny_hf_folder, wait_idle

LONG = 2000  # tokens of a generation that runs for seconds on the test machine
SLOW_REGEX = r"(.*.*)*xyz"  # catastrophic backtracking: the admission's probe runs its full 2 s and refuses it


# -- the pool, directly ------------------------------------------------------------------------------------------
@pytest.fixture
def pool(tmp_path):
    model = tiny_llama()
    for seed, name in enumerate(("a", "b", "c"), start=1):
        make_adapter(model, tmp_path / "adapters" / name, seed=seed)
    make_adapter(model, tmp_path / "b-v2", seed=9)
    return AdapterPool(model, tmp_path / "adapters", threading.RLock(), max_loaded=2)


def _consistent(pool: AdapterPool) -> None:
    """One entry per name, and the model holds exactly the loaded entries' adapters (no version left behind)."""
    entries = list(pool._loaded.values())
    assert sorted(lorakit.adapter_names(pool.model)) == sorted(e.internal for e in entries)
    assert [e.name for e in entries] == list(pool._loaded)


def _held_in_admission(pool: AdapterPool, parties: int = 1):
    """Make the next ``parties`` admissions wait inside ``_admit`` until the returned event is set (reached: set
    once all of them are inside), so a test can act while they run."""
    inside, go, real, count = threading.Event(), threading.Event(), pool._admit, [0]

    def admit(name, folder):
        count[0] += 1
        if count[0] >= parties:
            inside.set()
        assert go.wait(30)
        return real(name, folder)

    pool._admit = admit
    return inside, go


def _in_thread(target, *args):
    result: dict = {}

    def run():
        try:
            result["value"] = target(*args)
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_the_pool_lock_is_freed_by_one_release(pool):
    """``_admit_unlocked`` releases the pool's lock once. Condition's default lock is an RLock: a caller holding it
    twice would have kept it through the admission. The lock is a plain Lock now, which cannot be held twice."""
    with pool._cond:
        assert not pool._cond.acquire(blocking=False)
    pool.load("a")
    inside, go = _held_in_admission(pool)
    thread, result = _in_thread(pool.load, "b")
    assert inside.wait(30)
    started = time.monotonic()
    assert pool.pin_loaded("a") is not None  # the lock is free while b's files are checked
    pool.release("a")
    assert time.monotonic() - started < 1.0
    go.set()
    thread.join(30)
    assert result["value"]["name"] == "b"
    _consistent(pool)


def test_a_reload_pinned_during_its_checks_is_busy_and_the_old_version_serves(pool):
    pool.load("b")
    old = pool._loaded["b"].internal
    inside, go = _held_in_admission(pool)
    thread, result = _in_thread(pool.load, "b")
    assert inside.wait(30)
    assert pool.pin_loaded("b") == old  # a request pins b while its reload's checks run: not blocked by them
    go.set()
    thread.join(30)
    assert isinstance(result["error"], AdapterBusy) and "serving 1 request" in str(result["error"])
    assert pool._loaded["b"].internal == old
    pool.release("b")
    _consistent(pool)


def test_a_refused_reload_leaves_the_old_version(pool, tmp_path):
    pool.load("b")
    old = pool._loaded["b"].internal
    config_path = tmp_path / "adapters" / "b" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 10_000}))
    with pytest.raises(AdapterRejected, match="rank"):
        pool.load("b")
    assert pool._loaded["b"].internal == old
    _consistent(pool)


def test_two_reloads_of_one_name_at_once_end_with_one_adapter(pool, tmp_path):
    """Both reloads check the files at the same time; each then swaps its version in: one adapter named b remains,
    with the files' weights, and the model holds no other version."""
    pool.load("b")
    shutil.rmtree(tmp_path / "adapters" / "b")
    shutil.copytree(tmp_path / "b-v2", tmp_path / "adapters" / "b")
    inside, go = _held_in_admission(pool, parties=2)
    first, one = _in_thread(pool.load, "b")
    second, other = _in_thread(pool.load, "b")
    assert inside.wait(30)
    go.set()
    first.join(30)
    second.join(30)
    assert "error" not in one and "error" not in other, (one, other)
    _consistent(pool)
    assert list(pool._loaded) == ["b"]
    fresh = lorakit.read_adapter(tmp_path / "b-v2").tensors
    internal = pool._loaded["b"].internal
    loaded = dict(lorakit.lora_parameters(pool.model, internal))
    key = next(k for k in loaded if k.endswith("lora_B"))
    assert any(torch.equal(loaded[key].detach(), t) for t in fresh.values() if t.shape == loaded[key].shape)


def test_a_reload_whose_adapter_was_evicted_during_its_checks_loads_it_again(pool):
    pool.load("b")
    pool.load("a")  # b is now the least recently used
    inside, go = _held_in_admission(pool)
    thread, result = _in_thread(pool.load, "b")
    assert inside.wait(30)
    del pool._admit  # c's own admission runs unheld
    pool.acquire("c")  # evicts b, idle, while its reload checks its files
    assert "b" not in pool._loaded
    go.set()
    thread.join(30)
    assert result["value"]["name"] == "b" and set(pool._loaded) == {"b", "c"}  # a, idle, made room
    pool.release("c")
    _consistent(pool)


# -- the server, over a real socket ------------------------------------------------------------------------------
_LAUNCH = """
import os, sys
import lorakit.serve.cli as serve_cli
build = serve_cli.build_state
def build_state(args):
    state = build(args)
    state.acquire_timeout = float(os.environ["FOLLOWUPS_ACQUIRE_TIMEOUT"])  # seconds a request waits for room
    return state
serve_cli.build_state = build_state
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


class _Server(ServerProcess):
    """``ServerProcess`` whose requests wait at most 1 s for room in the pool (60 s in a real server), so a test
    meets the 503 of a full pool in a second."""

    def __init__(self, *args, **kwargs):
        import subprocess

        real = subprocess.Popen

        def popen(argv, env, **rest):
            assert argv[1:3] == ["-m", "lorakit"]
            return real([argv[0], "-c", _LAUNCH, *argv[3:]], env={**env, "FOLLOWUPS_ACQUIRE_TIMEOUT": "1"}, **rest)

        subprocess.Popen = popen
        try:
            super().__init__(*args, **kwargs)
        finally:
            subprocess.Popen = real


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("followups13_serve")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5, max_position_embeddings=LONG + 64)
    base = never_ending(model_dir)
    adapters = root / "adapters"
    for seed, name in enumerate(("orders", "support", "third"), start=3):
        make_adapter(base, adapters / name, seed=seed)
    process = _Server(model_dir, adapters, "--max-tokens", str(LONG), "--max-loaded", "2", log=root / "server.log")
    client = httpx.Client(base_url=process.url, timeout=60)
    try:
        yield {"url": process.url, "client": client, "adapters": adapters, "root": root}
    finally:
        client.close()
        process.stop()


def _text(client, model: str, max_tokens: int = 8) -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": max_tokens,
                                                    "temperature": 0})
    assert response.status_code == 200, response.text[:500]
    return response.json()["choices"][0]["text"]


def test_a_slow_reload_does_not_stall_other_adapters(server):
    """A reload of a loaded adapter checked its new files (up to 2 s of regex probes, the file read) under the
    pool's lock: a request on another adapter waited to pin, and one finishing meanwhile blocked the engine's
    thread in its unpin, stopping every stream. The checks now run unlocked; the refused reload leaves the old
    version serving."""
    client, adapters = server["client"], server["adapters"]
    assert client.post("/v1/adapters/load", json={"name": "support"}).status_code == 200
    before = _text(client, "support")
    config_path = adapters / "support" / "adapter_config.json"
    saved = config_path.read_text()
    config_path.write_text(json.dumps({**json.loads(saved), "target_modules": SLOW_REGEX}))
    gaps: list[float] = []
    took: list[float] = []  # the later request's time
    answered: list[str] = []  # the short request's text

    def reload() -> None:
        with httpx.Client(base_url=server["url"], timeout=30) as own:
            answer = own.post("/v1/adapters/load", json={"name": "support"})
            assert answer.status_code == 400 and "2 s" in answer.json()["error"]["message"], answer.text[:300]

    def later() -> None:
        started = time.monotonic()
        _text(client, "orders", max_tokens=2)
        took.append(time.monotonic() - started)

    reloading = threading.Thread(target=reload)
    try:
        with httpx.Client(base_url=server["url"], timeout=60) as own, own.stream(
                "POST", "/v1/completions", json={"model": "orders", "prompt": "x", "max_tokens": LONG,
                                                 "temperature": 0, "stream": True}) as streaming:
            lines = streaming.iter_lines()
            next(lines)
            # a request finishes during the reload's checks (its unpin runs on the engine's thread), another starts
            short = threading.Thread(target=lambda: answered.append(_text(client, "orders", max_tokens=150)))
            short.start()
            time.sleep(0.1)
            reloading.start()
            starting = threading.Timer(0.3, later)
            starting.start()
            last = time.monotonic()
            for _ in lines:
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                if not reloading.is_alive():
                    break
    finally:
        reloading.join()
        short.join()
        starting.join()
        config_path.write_text(saved)
    assert answered and answered[0]
    assert len(took) == 1 and took[0] < 1.0, took  # the later request did not wait for the 2 s check (1.8 s did)
    assert len(gaps) > 10 and max(gaps) < 0.5, max(gaps)
    assert _text(client, "support") == before  # the refused reload left the old version serving
    assert wait_idle(client, 5.0)


def test_a_full_pool_answers_503_with_retry_after(server):
    """Every loaded adapter in use and none evictable: the 503 ``adapter_busy`` told no client when to retry. It
    carries ``Retry-After`` (seconds), which the openai package's retries honour, and its message says so."""
    import openai

    client = server["client"]
    streams = []
    try:
        for model in ("orders", "support"):  # both places of --max-loaded 2 pinned by running streams
            own = httpx.Client(base_url=server["url"], timeout=60)
            stream = own.stream("POST", "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": LONG,
                                                                "temperature": 0, "stream": True})
            lines = stream.__enter__().iter_lines()
            streams.append((own, stream, lines))  # held: a line iterator collected closes its response
            next(lines)
        pinned = {entry["name"]: entry["in_use"] for entry in client.get("/v1/adapters").json()["data"]}
        assert pinned == {"orders": 1, "support": 1}, pinned
        answer = client.post("/v1/completions", json={"model": "third", "prompt": "x", "max_tokens": 2})
        assert answer.status_code == 503, answer.text[:300]
        error = answer.json()["error"]
        assert error["code"] == "adapter_busy" and "Retry-After" in error["message"]
        assert answer.headers["retry-after"] == "1"
        sdk = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            sdk.completions.create(model="third", prompt="x", max_tokens=2)
        assert caught.value.response.headers["retry-after"] == "1"
    finally:
        for own, stream, _ in streams:
            stream.__exit__(None, None, None)
            own.close()
    assert wait_idle(client, 10.0)
    assert _text(client, "third", max_tokens=2)  # room again once the streams ended
