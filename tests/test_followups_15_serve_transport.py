"""``lorakit serve``'s HTTP side against hostile or broken clients, and its start and stop, over real sockets.

- slow headers (slowloris): a connection that sends its request line and headers a byte at a time, or nothing,
  held its socket for good (uvicorn has no header deadline); now ``--header-timeout`` closes it, while ordinary
  clients and a slow but legitimate body upload are served;
- a request with both Transfer-Encoding and Content-Length is answered and its connection closed (RFC 9112 6.3);
- a flood of idle connections no longer uses up the server's descriptors (it raises its soft open-files limit);
- Ctrl-C and SIGTERM at each stage of ``lorakit serve`` (loading, serving, with requests running) end with one
  line and status 130 / 143; before, a Ctrl-C while serving ended with status 0 and no word, a SIGTERM with no
  word at all (killed by the signal), and the requests running at a SIGTERM are finished first;
- the server's refusal of an adapter trained on a resized vocabulary says what a server's operator can do.

The servers run ``python -m lorakit serve``; a ``sitecustomize`` hook on their PYTHONPATH slows the model load
(to signal it while loading) and each forward (so a generation lasts long enough to be signalled mid-way).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_serve_support import ServerProcess, free_port, never_ending, tiny_hf_folder

HEADER_S = 2.0  # the --header-timeout of the module's server
STEP_S = 0.05  # seconds each forward of the module's server takes at least (the hook): 40 tokens last 2 s

_HOOK = '''
import os, time
import lorakit

if os.environ.get("FU15_NOFILE"):  # the soft limit of open files many systems start a process with
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (int(os.environ["FU15_NOFILE"]),
                                                resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

_real = lorakit.load_base


def load_base(*args, **kwargs):
    with open(os.environ["FU15_MARK"], "a") as mark:
        mark.write("loading\\n")
    time.sleep(float(os.environ.get("FU15_LOAD_S", "0")))
    model, tokenizer = _real(*args, **kwargs)
    step = float(os.environ.get("FU15_STEP_S", "0"))
    if step:
        model.register_forward_pre_hook(lambda *_: time.sleep(step))
    return model, tokenizer


lorakit.load_base = load_base
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fu15_transport")
    model_dir = tiny_hf_folder(root / "model")
    never_ending(model_dir)  # answers run to max_tokens
    adapters = root / "adapters"
    adapters.mkdir()
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_HOOK)
    return {"root": root, "model": model_dir, "adapters": adapters, "hooks": hooks}


def _env(setup, mark: Path, load_s: float = 0.0, step_s: float = 0.0) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(setup["hooks"]), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "FU15_MARK": str(mark), "FU15_LOAD_S": str(load_s), "FU15_STEP_S": str(step_s)}


@pytest.fixture(scope="module")
def server(setup):
    process = ServerProcess(setup["model"], setup["adapters"], "--header-timeout", str(HEADER_S),
                            "--body-timeout", "30", log=setup["root"] / "server.log",
                            env={**_env(setup, setup["root"] / "server.mark", step_s=STEP_S), "FU15_NOFILE": "256"})
    try:
        yield process
    finally:
        process.stop()


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """What the server sent within ``seconds``, and whether it closed the connection by then."""
    sock.settimeout(0.2)
    data, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _complete(server, max_tokens: int = 3) -> dict:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/v1/completions", json={"model": "base", "prompt": "Hello", "max_tokens": max_tokens,
                                                      "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_slow_headers_are_cut_while_other_clients_are_served(server):
    """Before: uvicorn waited for a request's headers for ever, so each of these connections stayed open (a
    socket and a descriptor each: a few hundred starve the server); a connection that never sent a byte too."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    slow = [_connect(server) for _ in range(20)]
    idle = [_connect(server) for _ in range(20)]
    stop = threading.Event()

    def drip():  # one byte of each slow connection's headers every 0.25 s: never a whole head within the deadline
        for index in range(len(head)):
            if stop.wait(0.25):
                return
            for sock in slow:
                try:
                    sock.send(head[index:index + 1])
                except OSError:
                    pass

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        start = time.monotonic()
        while time.monotonic() - start < HEADER_S:  # ordinary clients are answered meanwhile
            assert _complete(server)["usage"]["completion_tokens"] == 3
        results = [_read_until_closed(sock, HEADER_S + 8) for sock in slow + idle]
    finally:
        stop.set()
        dripper.join()
        for sock in slow + idle:
            sock.close()
    assert all(closed for _, closed in results), sum(not closed for _, closed in results)
    took = time.monotonic() - start
    assert took < HEADER_S + 9, took
    first, _ = results[0]  # a head that came in part is told why, in the OpenAI error body
    assert first.startswith(b"HTTP/1.1 408 "), first[:200]
    error = json.loads(first.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and "--header-timeout" in error["message"]
    assert all(data == b"" for data, _ in results[len(slow):])  # nothing sent, nothing answered
    assert _complete(server)["usage"]["completion_tokens"] == 3


def test_a_slow_body_upload_within_the_body_timeout_is_served(server):
    """The header deadline is for the head only: a large body sent slowly, for longer than --header-timeout
    but within --body-timeout, is read and answered."""
    body = json.dumps({"model": "base", "prompt": "Hello", "max_tokens": 2, "temperature": 0,
                       "user": "u" * 200_000}).encode()
    sock = _connect(server)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        pieces = 10
        size = -(-len(body) // pieces)
        for index in range(pieces):  # 10 pieces over 2.5 x the header deadline
            time.sleep(HEADER_S * 2.5 / pieces)
            sock.sendall(body[index * size:(index + 1) * size])
        data, closed = _read_until_closed(sock, 30)
    finally:
        sock.close()
    assert closed and data.startswith(b"HTTP/1.1 200 "), data[:300]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 2


def test_the_next_request_on_a_kept_alive_connection_has_the_deadline_too(server):
    """An idle kept-alive connection waits the keep-alive time (75 s); once its next request begins, the head
    must come within --header-timeout. Before, the first byte of it switched every timer off: held for good.
    The same for bytes left past a body shorter than its Content-Length said: before, held 75 s."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b'{"model": "base", "prompt": "Hi", "max_tokens": 1}'
    for first, then in ((request, b"GET /hea"),
                        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%sGET /he"
                         % (len(body), body), b"")):
        sock = _connect(server)
        try:
            sock.sendall(first)
            data, closed = _read_until_closed(sock, 1.5)
            assert data.startswith(b"HTTP/1.1 200 ") and not closed, data[:200]
            if then:
                sock.sendall(then)
            start = time.monotonic()
            data, closed = _read_until_closed(sock, HEADER_S + 8)
        finally:
            sock.close()
        # closed without an answer: a late one could be read as the answer to a request sent meanwhile
        assert closed and data == b"", data[:200]
        assert time.monotonic() - start < HEADER_S + 6


def test_a_flood_of_idle_connections_does_not_lock_clients_out(server):
    """Started with a soft limit of 256 open files (the hook; 1024 is common), 300 idle connections used every
    descriptor: the server accepted nobody (asyncio logged a traceback a second) until they went. The server now
    raises its soft limit to the hard one."""
    limits = Path(f"/proc/{server.process.pid}/limits")
    if limits.exists():
        row = next(line for line in limits.read_text().splitlines() if line.startswith("Max open files"))
        soft, hard = row.split()[3:5]
        assert soft == hard, row
    idle = [_connect(server) for _ in range(300)]
    try:
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert _complete(server)["usage"]["completion_tokens"] == 3
        assert time.monotonic() - start < HEADER_S  # served at once, not when the idle ones were cut
    finally:
        for sock in idle:
            sock.close()


def test_transfer_encoding_with_content_length_closes_the_connection(server):
    """RFC 9112 6.3: the body is read as chunked, and the connection must be closed after the answer (a proxy
    in front that went by Content-Length would read the rest as another request: request smuggling). Before, the
    connection stayed open for the next request."""
    body = b'{"model": "base", "prompt": "Hi", "max_tokens": 1}'
    sock = _connect(server)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        data, closed = _read_until_closed(sock, 10)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 200 ") and closed, data[:300]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 1


# -- start and stop ------------------------------------------------------------------------------------------------
def _start(setup, tmp_path: Path, *extra: str, load_s: float = 0.0, step_s: float = 0.0):
    """``lorakit serve`` as a user starts it (SIGINT as in a terminal: the default handler), its port and mark file."""
    mark = tmp_path / "mark"
    port = free_port()
    env = {**os.environ, "LORAKIT_DISABLE_TRITON": "1", "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1",
           **_env(setup, mark, load_s, step_s)}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(setup["model"]),
                                "--adapters", str(setup["adapters"]), "--port", str(port), "--name", "base", *extra],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=Path(__file__).resolve().parents[1],
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return process, f"http://127.0.0.1:{port}", mark


def _wait(condition, seconds: float, process) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the server ended early: {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"timed out: {process.communicate()}")


def _serving(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _ended(process, status: int, line: str) -> str:
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"still running: {process.communicate()}") from None
    err = err.decode(errors="replace")
    assert process.returncode == status, (process.returncode, err)
    assert "Traceback" not in err and err.rstrip("\n").splitlines()[-1] == line, err
    return err


def test_sigterm_while_the_model_loads(setup, tmp_path):
    """Before: SIGTERM killed the process with no word (status -15). (A Ctrl-C then already said "interrupted".)"""
    process, _, mark = _start(setup, tmp_path, load_s=30)
    _wait(mark.exists, 90, process)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _ended(process, 143, "lorakit serve: stopped by SIGTERM")


def test_ctrl_c_while_serving_and_again_to_cut_the_running_requests(setup, tmp_path):
    """A Ctrl-C lets the running requests finish (said after a second); a second one cuts them. Before: status 0
    and nothing said (uvicorn raised the SIGINT again inside asyncio.run's own handler, which only cancelled a
    task that had ended), and each cut request was logged as an error with a CancelledError traceback."""
    process, url, _ = _start(setup, tmp_path, step_s=0.05)  # 200 tokens: 10 s at least
    _wait(lambda: _serving(url), 90, process)
    streamed: dict = {}
    begun = threading.Event()

    def stream():
        events = []
        try:
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                    "model": "base", "prompt": "Hello", "stream": True, "max_tokens": 200, "temperature": 0}) as answer:
                for event in answer.iter_lines():
                    begun.set()
                    events.append(event)
        except httpx.HTTPError as error:
            streamed["error"] = error
        streamed["events"] = events

    client = threading.Thread(target=stream)
    client.start()
    assert begun.wait(30)
    process.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert process.poll() is None  # waiting for the stream
    process.send_signal(signal.SIGINT)
    err = _ended(process, 130, "lorakit serve: interrupted")
    client.join(30)
    assert "data: [DONE]" not in streamed["events"]  # cut
    assert all(line.startswith("lorakit serve: ") for line in err.strip().splitlines()), err


def test_sigterm_lets_running_requests_finish(server):
    """SIGTERM (docker stop, systemd, Kubernetes) while a stream runs: the server stops taking connections,
    says it waits for the running request, finishes its stream, then ends with 143. Before: killed by the
    signal once drained (status -15, no word). The module's server: this test ends it, so it comes last."""
    tokens = 40
    events = []
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/v1/completions", json={
                "model": "base", "prompt": "Hello", "stream": True, "max_tokens": tokens, "temperature": 0}) as answer:
            lines = answer.iter_lines()
            for event in lines:
                if event.startswith("data: "):
                    events.append(event)
                    break
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert not _serving(server.url)  # no new connections meanwhile
            events += [event for event in lines if event.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    texts = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["length"] and texts
    assert server.process.wait(timeout=30) == 143
    log = server.output()
    assert "Traceback" not in log and log.rstrip("\n").splitlines()[-1] == "lorakit serve: stopped by SIGTERM", log
    assert "waiting for 1 running request(s) to finish" in log, log


def test_header_timeout_flag_is_checked_first(tmp_path, capsys):
    from lorakit.cli import main

    assert main(["serve", "--adapters", str(tmp_path), "--port", "0", "--header-timeout", "0"]) == 2
    assert "--header-timeout must be a positive number of seconds, got 0.0" in capsys.readouterr().err


# -- a resized vocabulary ------------------------------------------------------------------------------------------
def test_a_resized_vocabulary_adapter_is_refused_with_what_to_do(tmp_path):
    """The refusal said 'load it on the resized base it was saved with, or on a base holding no other adapters
    (load_adapter resizes that one ...)': library advice a server's operator cannot follow (the server never
    resizes its shared base). Now it says to merge the adapter into its base and serve the merged model."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.serve.pool import AdapterPool, AdapterRejected

    model_dir = tiny_hf_folder(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<new1>", "<new2>"])
    grown = AutoModelForCausalLM.from_pretrained(model_dir)
    grown.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    trained = peft.get_peft_model(grown, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trained.save_pretrained(tmp_path / "adapters" / "grown", save_embedding_layers=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pool = AdapterPool(model, tmp_path / "adapters", threading.RLock())
    with pytest.raises(AdapterRejected) as refused:
        pool.acquire("grown")
    said = str(refused.value)
    assert "holding no other adapters" not in said and "\n" not in said
    assert f"resized to {len(tokenizer)} tokens" in said
    assert "lorakit merge" in said and "lorakit serve --model" in said
    assert str(tmp_path) not in said  # the server's folders stay hidden from clients
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) - 2
