"""Time and size limits on rendering chat templates, which are Jinja code run on every chat request.

An adapter folder's chat template (and a request's ``chat_template``, where ``--trust-request-chat-template``
allows one) is code from outside the server. transformers renders it in Jinja's sandbox, which stops it reading
files or attributes it should not, but not from looping: nested ``range(100000)`` loops run for hours, holding a
server thread, and the text side's lock with it, all the while. Two guards:

- at load (:func:`check_template`): the template renders a sample chat in a child process, under a time limit
  (``RENDER_TIMEOUT_S``, counted from when the child is ready: a slow start on a loaded machine is not the
  template's), a memory limit (``CHILD_MEMORY_BYTES``: a ``"x" * 10**10`` would otherwise take the server's
  memory) and an output limit; an adapter whose template fails one is refused in one line.
- per request (:func:`with_deadline`): the render runs in the request's worker thread under a deadline; past it,
  an exception is raised in that thread (``PyThreadState_SetAsyncExc``: Jinja's compiled templates are Python
  bytecode, which checks for it at every loop's jump back), so a template slow only on some messages costs that
  request a 400 after ``RENDER_TIMEOUT_S``, and the thread and the lock are free again.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import threading
from typing import Any, Callable, TypeVar

from lorakit.errors import LorakitError

RENDER_TIMEOUT_S = 5.0  # a real template renders a long chat in milliseconds
CHILD_MEMORY_BYTES = 1 << 30  # the load check's child process: address space (Python and Jinja take ~100 MB)
MAX_SAMPLE_OUTPUT = 1 << 20  # characters the sample chat may render to (real templates: a few hundred)
_START_S = 60.0  # the child's start (Python, Jinja's import) on a loaded machine, on top of the render's limit

T = TypeVar("T")


class TemplateTooSlow(LorakitError):
    """A chat template that took over its time (or memory, or output) limit to render."""


class _Deadline(BaseException):
    """Raised in the rendering thread at its deadline. A BaseException: the ``except Exception`` of transformers
    and of lorakit's callers (which turn a template's errors into 'refused these messages') let it through."""


def with_deadline(render: Callable[[], T], seconds: float = RENDER_TIMEOUT_S) -> T:
    """``render()`` in this thread, interrupted after ``seconds``: raises ``TemplateTooSlow`` then (one line; the
    caller says whose template it was)."""
    ident = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire() -> None:
        with lock:
            if not state["done"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(_Deadline))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        try:
            return render()
        finally:
            timer.cancel()
            with lock:
                state["done"] = True
                if state["fired"]:  # set but not raised yet (render returned just then): never raised later
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
    except _Deadline:
        raise TemplateTooSlow(f"the chat template took over {seconds:g} s to render these messages (it loops "
                              "too long)") from None


# Runs in a child process. stdin: {"template", "seconds", "memory"}. Exit 0: rendered (or refused the sample, or
# uses what this plain environment lacks: the per-request deadline still guards it), 3: too slow, 4: out of memory,
# 5: too long an output (its length on stdout).
_PROBE = r"""
import json, signal, sys
job = json.load(sys.stdin)
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
except (ImportError, ValueError, OSError):
    pass
from jinja2.sandbox import ImmutableSandboxedEnvironment
class Slow(BaseException):
    pass
def alarm(*_):
    raise Slow
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
def fail(message):
    raise ValueError(message)
env.globals.update(raise_exception=fail, strftime_now=lambda f: "1 January 2026")
messages = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Germany?"}]
signal.signal(signal.SIGALRM, alarm)
signal.setitimer(signal.ITIMER_REAL, job["seconds"])
try:
    text = env.from_string(job["template"]).render(messages=messages, add_generation_prompt=True, bos_token="<s>",
                                                    eos_token="</s>", tools=None, documents=None)
except Slow:
    sys.exit(3)
except MemoryError:
    sys.exit(4)
except Exception:
    sys.exit(0)
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
if len(text) > job["limit"]:
    print(len(text))
    sys.exit(5)
"""

_passed: set[int] = set()  # hashes of templates already checked (an adapter unloaded and loaded again)


FOLDER_FIX = "fix chat_template.jinja (or tokenizer_config.json's chat_template) in its folder"


def check_template(template: Any, seconds: float = RENDER_TIMEOUT_S, fix: str = FOLDER_FIX) -> None:
    """Raise ``TemplateTooSlow`` (one line, about "its chat template": the caller names whose) if ``template``
    (a Jinja string, or transformers' dict of named templates) takes over ``seconds``, ``CHILD_MEMORY_BYTES`` or
    ``MAX_SAMPLE_OUTPUT`` characters to render a four-message sample chat; ``fix``: what the line says to do."""
    templates = [template] if isinstance(template, str) else \
        [t for t in (template.values() if isinstance(template, dict) else ()) if isinstance(t, str)]
    for text in templates:
        if hash(text) in _passed:
            continue
        job = json.dumps({"template": text, "seconds": seconds, "memory": CHILD_MEMORY_BYTES,
                          "limit": MAX_SAMPLE_OUTPUT})
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _PROBE], input=job, capture_output=True, text=True,
                                  timeout=seconds + _START_S)
        except subprocess.TimeoutExpired:
            done = None
        except OSError:  # no child process here (a sandbox): the per-request deadline alone guards it
            return
        code = 3 if done is None else done.returncode
        if code == 3:
            raise TemplateTooSlow(f"its chat template takes over {seconds:g} s to render a four-message chat (it "
                                  f"loops too long); {fix}")
        if code == 4:
            raise TemplateTooSlow(f"its chat template takes over {CHILD_MEMORY_BYTES >> 20} MiB of memory to render "
                                  f"a four-message chat (it builds huge strings); {fix}")
        if code == 5:
            raise TemplateTooSlow(f"its chat template writes {int(done.stdout.strip() or 0):,} characters for a "
                                  f"four-message chat, over the limit of {MAX_SAMPLE_OUTPUT:,}; {fix}")
        if len(_passed) > 1024:
            _passed.clear()
        _passed.add(hash(text))
