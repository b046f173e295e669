"""Twelfth new-user audit, the command line: every subcommand given wrong, missing or hostile arguments.

Each test pins one finding. The rule they hold the CLI to: a user's mistake is one line on stderr (exit 2, no
traceback), said *before* any model loads when the arguments alone can tell (the ``no_load`` fixture makes a model
load fail the test), and a refused command leaves no output folder behind.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_llama
from lorakit.cli import main
from test_serve_support import make_adapter
from test_train_helpers import make_model_folder, task_records, write_jsonl


class ModelLoaded(BaseException):
    """Raised where a model (or its tokenizer) would start loading: a check came too late."""


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the refusal under test must come from the arguments alone."""
    import lorakit.models.loading as loading

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model started loading before the mistake was found")

    monkeypatch.setattr(loading, "load_tokenizer", refuse)
    monkeypatch.setattr(loading, "_load_dense", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, a second one of other shapes, training data, and adapters made on the first."""
    root = tmp_path_factory.mktemp("cli12")
    tiny = make_model_folder(root / "tiny")
    other = root / "other"  # hidden 48 instead of 32: no adapter of `tiny` fits it
    tiny_llama(vocab_size=32, hidden_size=48, intermediate_size=40, num_hidden_layers=2).save_pretrained(other)
    shutil.copy(tiny / "tokenizer.json", other)
    shutil.copy(tiny / "tokenizer_config.json", other)
    adapter = make_adapter(tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2),
                           root / "adapter", seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] in (None, "")  # a model built in memory has no name: nothing to tell
    return {"root": root, "tiny": tiny, "other": other, "adapter": adapter,
            "data": write_jsonl(root / "train.jsonl", task_records(8, seed=1))}


def _refused(capsys, argv: list[str]) -> str:
    """Run the CLI; it must refuse with exit 2 and one stderr line (no traceback). Returns that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "Writing model shards" not in line]
    assert len(lines) == 1, lines
    return lines[0]


# -- lorakit train ----------------------------------------------------------------------------------------------------
def test_train_max_length_below_two_is_refused_before_the_model_loads(files, capsys, no_load, tmp_path):
    """--max-length 1 passed the config checks (a positive integer) and failed in the data code after the model had
    loaded, with 'max_length=1 is too small' (the API's name, not the flag)."""
    for value in ("1", "0", "-5"):
        line = _refused(capsys, ["train", "--model", files["tiny"], "--data", files["data"], "--out", tmp_path / "run",
                                 "--max-length", value])
        assert line == (f"lorakit train: error: --max-length must be at least 2 (an example needs a token to read and "
                        f"one to predict; the default is 256), got {value}")
    assert not (tmp_path / "run").exists()


def test_train_missing_config_file_says_how_to_write_one(capsys, no_load, tmp_path, monkeypatch):
    """'config file not found: run.yaml' said nothing about where it was looked for or what goes in one."""
    from lorakit.train.cli import EPILOG
    from lorakit.train.config import read_config_file

    monkeypatch.chdir(tmp_path)
    line = _refused(capsys, ["train", "--config", "run.yaml"])
    assert line == (f"lorakit train: error: config file run.yaml does not exist (paths are read from the current "
                    f"folder, {tmp_path}); give a YAML, TOML or JSON file of options, e.g. run.yaml holding the lines "
                    "'rank: 8' and 'epochs: 3' (`lorakit train --help` lists every option; each run writes its own as "
                    "RUN/config.yaml)")
    (tmp_path / "conf").mkdir()
    assert "config file conf is a folder, not a file (paths" in _refused(capsys, ["train", "--config", "conf"])
    # the example the --help text shows is a config file lorakit reads
    example = EPILOG.split("# run.yaml\n", 1)[1]
    (tmp_path / "run.yaml").write_text("\n".join(line[2:] for line in example.splitlines()) + "\n")
    assert read_config_file(tmp_path / "run.yaml") == {"model": "./my-base", "data": ["train.jsonl"],
                                                       "val_fraction": 0.1, "rank": 8, "epochs": 3.0}



def test_train_mistakes_config_json_and_the_environment_tell_are_refused_before_loading(files, capsys, no_load,
                                                                                          tmp_path, monkeypatch):
    """Each of these was found only after the model had loaded (minutes for a large base): a --max-length beyond the
    context config.json declares, a --global-batch the batch does not divide, --tensorboard without its package,
    a module name in --targets / --exclude / --modules-to-save that the model does not have, and a --rank above
    every size of the model (which ran out of memory with a traceback)."""
    import sys

    train = ["train", "--model", files["tiny"], "--data", files["data"], "--out", tmp_path / "run"]
    cases = [
        (["--max-length", "100000"], "--max-length 100000 is longer than the model's context of 128 tokens "
                                     "(max_position_embeddings in its config.json); pass --max-length 128 or less"),
        (["--global-batch", "7", "--batch-size", "2"], "--global-batch 7 is not a multiple of --batch-size 2 x 1 "
                                                       "processes = 2"),
        (["--targets", "q_proj", "v_prj"], "--targets 'v_prj' matches no module of this model (did you mean 'v_proj'?)"),
        (["--exclude", "lm_hed"], "--exclude 'lm_hed' matches no module of this model (did you mean 'lm_head'?)"),
        (["--targets", "q_proj", "--modules-to-save", "lm_heads"], "--modules-to-save 'lm_heads' matches no module"),
        # a RuntimeError traceback from the allocator (128 GB for rank 1e9 on this 32-wide model)
        (["--rank", "1000000000"], "--rank 1000000000 is above every size of this model (the largest in its "
                                   "config.json is 40), and a layer's update has rank at most min(in, out): lower "
                                   "--rank (e.g. 16)"),
    ]
    for flags, said in cases:
        assert said in _refused(capsys, [*train, *flags]), flags
    assert _refused(capsys, ["demo", "--model", files["tiny"], "--rank", "1000000000"]).startswith(
        "lorakit demo: error: --rank 1000000000 is above every size of this model")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert "--tensorboard needs the tensorboard package" in _refused(capsys, [*train, "--tensorboard"])
    assert not (tmp_path / "run").exists()




def test_train_resume_from_a_folder_that_is_no_run_is_named_before_loading(files, capsys, no_load, tmp_path):
    """--resume with an adapter folder, a model folder, a file or a run's own adapter folder loaded the model, then
    failed with '--max-length 256 is longer than the model's context' (the resume took every option as given)."""
    run = tmp_path / "my run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)  # the layout a run leaves (its state is not read here)
    (run / "config.yaml").write_text("rank: 2\n")
    shutil.copytree(files["adapter"], run / "adapter")
    train = ["train", "--model", files["tiny"], "--data", files["data"], "--resume"]
    not_run = ("not a run folder: --resume continues a stopped `lorakit train` run from its checkpoints "
               "(RUN/checkpoints); to start a run, leave --resume out")
    cases = [
        (files["adapter"], f"--resume {files['adapter']} is an adapter folder, {not_run}"),
        (files["tiny"], f"--resume {files['tiny']} is a model folder, {not_run}"),
        (files["data"], f"--resume {files['data']} is a file; give the run folder (the --out of the earlier run) or "
                        "one of its checkpoints"),
        (run / "adapter", f"--resume {run / 'adapter'} sits inside the run folder {run}; give that folder: "
                          f"--resume '{run}'"),
    ]
    for resume, said in cases:
        assert _refused(capsys, [*train, resume]) == f"lorakit train: error: {said}"


# -- lorakit eval -----------------------------------------------------------------------------------------------------
def test_eval_argument_mistakes_are_refused_before_the_model_loads(files, capsys, no_load, tmp_path):
    """--max-length 1 (and one beyond the context) failed after the model had loaded, --samples -1 was accepted, a
    missing or empty --adapter folder was read only after the base had loaded, and without --model an adapter of
    another base was tried on the default one (generate and merge said 'pass --model' first)."""
    evaluate = ["eval", "--model", files["tiny"], "--data", files["data"]]
    named = shutil.copytree(files["adapter"], tmp_path / "named")
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(files["tiny"])}))
    (tmp_path / "empty").mkdir()
    cases = [
        ([*evaluate, "--max-length", "1"], "--max-length must be at least 2 (an example needs a token to read and one "
                                           "to predict), got 1"),
        ([*evaluate, "--max-length", "4096"], "--max-length 4096 is longer than the model's context of 128 tokens "
                                              "(max_position_embeddings in its config.json); pass --max-length 128"),
        ([*evaluate, "--samples", "-1"], "--samples must be 0 or more (generations to print), got -1"),
        ([*evaluate, "--adapter", tmp_path / "none"], f"adapter folder {tmp_path / 'none'} does not exist"),
        ([*evaluate, "--adapter", tmp_path / "empty"], f"{tmp_path / 'empty' / 'adapter_model.safetensors'} not found"),
        (["eval", "--data", files["data"], "--adapter", named],
         f"--adapter {named} was trained on {str(files['tiny'])!r} (base_model_name_or_path in its adapter_config.json), "
         f"not on the default --model smollm2-135m; pass --model {files['tiny']}"),
    ]
    for argv, said in cases:
        line = _refused(capsys, argv)
        assert line.startswith("lorakit eval: error: " + said), line


def test_eval_names_the_adapters_base_when_it_does_not_fit(files, capsys):
    """The shape error of an adapter on another base ended without a word about --model (as in generate)."""
    line = _refused(capsys, ["eval", "--model", files["other"], "--data", files["data"], "--adapter", files["adapter"]])
    assert "was made for another base model" in line and line.endswith(
        "; pass --model with the folder of the model it was trained on (its adapter_config.json names no "
        "base_model_name_or_path)"), line



# -- empty arguments (an unset shell variable) -----------------------------------------------------------------------
def test_an_empty_path_argument_is_named_as_empty(files, capsys, no_load, tmp_path, monkeypatch):
    """--model "$BASE" with BASE unset was read as the current folder ('. has no config.json'); --adapter '' in merge
    said '--out m is, holds or sits inside the adapter folder ;'; train --out '' trained into runs/<date-time> and
    eval --json '' wrote no results, both without a word."""
    monkeypatch.chdir(tmp_path)
    model_fix = "--model is empty (an unset shell variable?); give the model folder or an embedded name, e.g. smollm2-135m"
    adapter_fix = ("--adapter is empty (an unset shell variable?); give the adapter folder that holds "
                   "adapter_config.json, e.g. runs/mine/adapter")
    tiny, adapter, data = (str(files[k]) for k in ("tiny", "adapter", "data"))
    cases = [
        (["train", "--model", "", "--data", data], model_fix),
        (["train", "--model", tiny, "--data", data, "--out", ""], "--out is empty (an unset shell variable?); give the "
                                                                "run folder, e.g. runs/mine (or leave it out: "
                                                                "runs/<date-time>)"),
        (["eval", "--model", "", "--data", data], model_fix),
        (["eval", "--model", tiny, "--data", data, "--json", ""], "--json is empty (an unset shell variable?); give "
                                                                  "the results file, e.g. --json results.json"),
        (["generate", "--model", "", "Hello"], model_fix),
        (["generate", "--model", tiny, "--adapter", " ", "Hello"], adapter_fix),
        (["merge", "--model", tiny, "--adapter", "", "--out", "m"], adapter_fix),
        (["merge", "--model", "", "--adapter", adapter, "--out", "m"], model_fix),
        (["combine", "--model", tiny, "--adapter", "", "--out", "c"], adapter_fix),
        (["quantize", "--model", "", "--out", "q"], model_fix),
        (["demo", "--model", ""], model_fix),
        (["inspect", ""], "the adapter folder given is '' (an unset shell variable?)"),
    ]
    if importlib.util.find_spec("fastapi"):
        cases += [(["serve", "--model", "", "--adapters", tmp_path, "--port", "0"], model_fix),
                  (["serve", "--model", tiny, "--adapters", "", "--port", "0"], "--adapters is empty")]
    for argv, said in cases:
        line = _refused(capsys, argv)
        assert line.startswith(f"lorakit {argv[0]}: error: {said}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, output or results file was started



def test_generate_seed_and_eval_json_device_are_one_line_in_flag_terms(files, capsys, no_load):
    """generate --seed 1e23 said 'seed must be ... or None' (the API's words); eval --json /dev/null was accepted,
    and the atomic write of the results would have replaced the device file (run as root)."""
    line = _refused(capsys, ["generate", "--model", files["tiny"], "--seed", "99999999999999999999999", "Hello"])
    assert line == ("lorakit generate: error: --seed must be an integer in [-2**63, 2**64), got "
                    "99999999999999999999999")
    line = _refused(capsys, ["eval", "--model", files["tiny"], "--data", files["data"], "--json", "/dev/null"])
    assert line == ("lorakit eval: error: --json /dev/null is not a regular file (a device or a pipe), which the "
                    "results would replace; give a file path, e.g. --json results.json")



def test_an_adapter_folder_given_as_model_is_named_as_an_adapter(files, capsys, no_load, tmp_path):
    """--model ADAPTER (the two folders swapped) said 'has no config.json; give a Hugging Face model folder', which
    does not tell that the folder is an adapter, nor which base it needs."""
    named = shutil.copytree(files["adapter"], tmp_path / "named")
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "my-base"}))
    for argv in (["generate", "--model", named, "Hello"], ["train", "--model", named, "--data", files["data"]],
                 ["merge", "--model", named, "--adapter", files["adapter"], "--out", tmp_path / "m"],
                 ["eval", "--model", named, "--data", files["data"]], ["quantize", "--model", named, "--out", tmp_path / "q"]):
        line = _refused(capsys, argv)
        assert line == (f"lorakit {argv[0]}: error: --model {named} is an adapter folder (adapter_config.json), not a "
                        "base model; give the folder of the base it was trained on as --model (its adapter_config.json "
                        "names 'my-base')"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["named"]



def test_standard_input_and_device_files_are_named_for_what_they_are(files, capsys, no_load):
    """--data - said 'data file not found: -'; /dev/null as --adapter said 'adapter folder /dev/null does not exist',
    and as --model 'neither an embedded model nor a local folder'."""
    stdin_fix = "--data -: lorakit reads data from files, not standard input; save the records to a file first"
    assert stdin_fix in _refused(capsys, ["train", "--model", files["tiny"], "--data", "-"])
    assert stdin_fix in _refused(capsys, ["eval", "--model", files["tiny"], "--data", "-"])
    line = _refused(capsys, ["generate", "--model", files["tiny"], "--adapter", "/dev/null", "Hello"])
    assert line == ("lorakit generate: error: --adapter /dev/null is not a folder (a device, pipe or socket); give the "
                    "adapter folder (adapter_config.json, adapter_model.safetensors)")
    line = _refused(capsys, ["merge", "--model", "/dev/null", "--adapter", files["adapter"], "--out", "m"])
    assert line == ("lorakit merge: error: --model /dev/null is not a folder (a device, pipe or socket); give the "
                    "model folder (config.json, safetensors weights, tokenizer files)")


# -- lorakit combine --------------------------------------------------------------------------------------------------
def test_combine_weights_and_ranks_the_adapter_configs_refuse_are_said_before_loading(files, capsys, no_load, tmp_path):
    """--method linear (or ties, dare...) on adapters of different ranks was refused only after the base had loaded,
    weights that are all 0 wrote an adapter that changes nothing, and --seed with a method that draws no random
    mask was ignored, both without a word."""
    model = tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)
    rank8 = make_adapter(model, tmp_path / "rank 8", seed=2, r=8)  # a space in the name, as users' folders have
    combine = ["combine", "--model", files["tiny"], "--out", tmp_path / "out"]
    line = _refused(capsys, [*combine, "--adapter", files["adapter"], "--adapter", rank8, "--method", "linear"])
    assert line == ("lorakit combine: error: --method linear needs adapters of one rank, got adapter: r=4, rank 8: r=8; "
                    "use --method cat (rank 12, exact) or svd (rank --svd-rank, default 8)")
    line = _refused(capsys, [*combine, "--adapter", f"{files['adapter']}=0", "--adapter", f"{rank8}=0"])
    assert line == ("lorakit combine: error: every --adapter weight is 0, so the combined adapter would change "
                    "nothing; give the adapters weights, e.g. --adapter a=0.7 --adapter b=0.3")
    line = _refused(capsys, [*combine, "--adapter", files["adapter"], "--adapter", rank8, "--seed", "3"])
    assert line == ("lorakit combine: error: --seed seeds the random masks of the dare methods; --method cat draws "
                    "none: leave --seed out")  # it was ignored without a word
    assert not (tmp_path / "out").exists()



@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nothing can be made")
def test_an_output_place_nothing_can_be_written_to_is_refused_before_loading(files, capsys, no_load):
    """/proc passes the permission check (os.access, and root passes any), so merge, quantize, combine, train and
    eval --json loaded the model and only then failed to write (train: after its data was read and tokenized)."""
    tiny, adapter, data = (str(files[k]) for k in ("tiny", "adapter", "data"))
    cases = [
        (["merge", "--model", tiny, "--adapter", adapter, "--out", "/proc/merged"], "--out /proc/merged"),
        (["quantize", "--model", tiny, "--out", "/proc/nf4"], "--out /proc/nf4"),
        (["combine", "--model", tiny, "--adapter", adapter, "--out", "/proc/combined"], "--out /proc/combined"),
        (["train", "--model", tiny, "--data", data, "--out", "/proc/runs/mine"], "--out /proc/runs/mine"),
        (["eval", "--model", tiny, "--data", data, "--json", "/proc/results.json"], "--json /proc/results.json"),
    ]
    for argv, given in cases:
        line = _refused(capsys, argv)
        assert line.startswith(f"lorakit {argv[0]}: error: {given}: cannot write in /proc ("), line
        assert line.endswith(f"); choose another {given.split()[0]}"), line


# -- an adapter on the wrong base -----------------------------------------------------------------------------------
def test_an_adapter_that_does_not_fit_the_default_base_says_to_pass_model(files, capsys, monkeypatch, tmp_path):
    """Without --model, an adapter whose adapter_config.json names no base is tried on the default base; its shape
    (or fingerprint) error said 'the adapter was made for a different model' and nothing about --model. The default
    is pointed at a tiny model of other shapes here, so the embedded model is not needed."""
    import safetensors.torch

    import lorakit.commands._args as args_module

    monkeypatch.setattr(args_module, "DEFAULT_MODEL", str(files["other"]))
    unsigned = shutil.copytree(files["adapter"], tmp_path / "unsigned")  # no lorakit fingerprint: the shapes tell
    weights = unsigned / "adapter_model.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights)
    fix = (f"; --model was not given, so the default {files['other']} was loaded: pass --model with the folder of the "
           "model it was trained on (its adapter_config.json names no base_model_name_or_path)")
    for adapter, said in ((files["adapter"], "was made for another base model"), (unsigned, "has shape (4, 32), but")):
        line = _refused(capsys, ["generate", "--adapter", adapter, "Hello"])
        assert said in line and line.endswith(fix), line
        line = _refused(capsys, ["merge", "--adapter", adapter, "--out", tmp_path / "merged"])
        assert said in line and line.endswith(fix), line
        line = _refused(capsys, ["combine", "--adapter", adapter, "--out", tmp_path / "combined"])
        assert said in line and line.endswith(fix), line
    assert not (tmp_path / "merged").exists() and not (tmp_path / "combined").exists()
    # --model given but not the adapter's base: the base its adapter_config.json names is the one to pass
    named = shutil.copytree(files["adapter"], tmp_path / "named")
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(files["tiny"])}))
    line = _refused(capsys, ["generate", "--model", files["other"], "--adapter", named, "Hello"])
    assert line.endswith(f"names the base {str(files['tiny'])!r}); pass --model {files['tiny']}"), line



def test_train_config_file_keys_given_twice_and_bad_values_name_the_file(capsys, no_load, tmp_path, monkeypatch):
    """A key given twice in a YAML or JSON config was read silently as its last value ('rank: 8' early in the file
    overridden by a forgotten 'rank: 16'); a bad value from the file alone was reported as the flag, as if typed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "twice.yaml").write_text("rank: 8\nlr: 0.001\nrank: 16\n")
    assert _refused(capsys, ["train", "--config", "twice.yaml"]) == (
        "lorakit train: error: twice.yaml line 3: 'rank' is given twice (lines 1 and 3); keep one")
    (tmp_path / "twice.json").write_text('{"rank": 8, "rank": 16}')
    assert _refused(capsys, ["train", "--config", "twice.json"]) == (
        "lorakit train: error: twice.json: 'rank' is given twice; keep one")
    (tmp_path / "short.yaml").write_text("max_length: 1\n")
    assert _refused(capsys, ["train", "--config", "short.yaml"]).startswith(
        "lorakit train: error: short.yaml: --max-length must be at least 2")
    # the same value typed on the command line is the flag's, not the file's
    assert _refused(capsys, ["train", "--config", "short.yaml", "--max-length", "0"]).startswith(
        "lorakit train: error: --max-length must be at least 2")


# -- lorakit serve ----------------------------------------------------------------------------------------------------
def test_serve_argument_mistakes_are_one_line_before_the_model_loads(files, capsys, no_load, tmp_path):
    """A missing or file --adapters and --max-context 1 were found after the model had loaded; an unknown
    --log-level was uvicorn's KeyError traceback; a file as --model said 'model ...' and an absent GPU said
    'device cuda ... use device cpu' (not the flags); one adapter's own folder as --adapters served nothing without a
    word; --name '' served the base under an empty name."""
    pytest.importorskip("fastapi")
    (tmp_path / "adapters").mkdir()
    serve = ["serve", "--model", files["tiny"], "--port", "0"]
    ok = [*serve, "--adapters", tmp_path / "adapters"]
    cases = [
        ([*serve, "--adapters", tmp_path / "none"], f"--adapters {tmp_path / 'none'} does not exist; create it and put "
                                                    "one adapter per subfolder (each is served under its folder's name)"),
        ([*serve, "--adapters", files["data"]], f"--adapters {files['data']} is a file, not a folder"),
        ([*serve, "--adapters", files["adapter"]], f"--adapters {files['adapter']} is one adapter's folder "
                                                   f"(adapter_config.json); give the folder that holds it, --adapters "
                                                   f"{files['root']}, to serve it as 'adapter'"),
        ([*ok, "--max-context", "1"], "--max-context must be at least 2, got 1"),
        ([*ok, "--name", " "], "--name is empty; give the model name clients send"),
        (["serve", "--model", files["data"], "--adapters", tmp_path / "adapters", "--port", "0"],
         f"--model {files['data']} is a file, not a model folder"),
        ([*ok, "--device", "cuda:7"], "--device cuda:7: "),
    ]
    for argv, said in cases:
        line = _refused(capsys, argv)
        assert line.startswith("lorakit serve: error: " + said), line
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal, which names the choices
        main([str(a) for a in [*ok, "--log-level", "loud"]])
    assert exit_info.value.code == 2
    assert "argument --log-level: invalid choice: 'loud' (choose from 'critical', 'error', 'warning', 'info', " \
           "'debug', 'trace')" in capsys.readouterr().err




def test_a_mistyped_command_gets_a_did_you_mean(capsys):
    """`lorakit trian` printed the whole usage and 'invalid choice: ... (choose from ...)'; `lorakit --help` showed
    no example of a first session."""
    from lorakit.cli import EPILOG, build_parser

    assert main(["trian", "--data", "x.jsonl"]) == 2
    assert capsys.readouterr().err == ("lorakit: error: unknown command 'trian'; did you mean 'train'? (lorakit --help "
                                       "describes each)\n")
    assert main(["xyzzy"]) == 2
    assert "unknown command 'xyzzy'; the commands are demo, train, eval" in capsys.readouterr().err
    assert build_parser().epilog == EPILOG and "lorakit COMMAND --help" in EPILOG



def test_argparse_refusals_are_one_line_with_the_option_meant(capsys):
    """A bad number or a missing option printed argparse's whole usage first (40 lines for train) above the error;
    an unknown option was blamed on 'lorakit' (not the command) with no hint of the option meant."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--rank", "abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("lorakit train: error: argument --rank: invalid int value: 'abc' "
                                       "(`lorakit train --help` lists the options)\n")
    with pytest.raises(SystemExit):
        main(["merge", "--model", "x"])
    assert capsys.readouterr().err == ("lorakit merge: error: the following arguments are required: --adapter, --out "
                                       "(`lorakit merge --help` lists the options)\n")
    for argv, meant in ((["train", "--max-lenght", "64"], "--max-length"),  # a typo
                        (["train", "--learning-rate", "1e-4"], "--lr"),      # transformers' name for it
                        (["train", "--lora-r", "8"], "--rank"),              # peft's
                        (["generate", "--adapters", "a", "Hello"], "--adapter")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lorakit {argv[0]}: error: unrecognized arguments: ") and err.count("\n") == 1, err
        assert f"; did you mean {meant}? (`lorakit {argv[0]} --help` lists the options)" in err, err
    assert main(["train", "--bogus"]) == 2
    assert capsys.readouterr().err == ("lorakit train: error: unrecognized arguments: --bogus (`lorakit train --help` "
                                       "lists the options)\n")


# -- how long a refusal takes -------------------------------------------------------------------------------------------
def test_argument_mistakes_are_refused_before_transformers_or_the_server_is_imported(files, tmp_path):
    """The measure of 'refused in a second': nothing heavier than torch is imported before the one line. merge,
    quantize, combine and generate read the model folder's config.json through transformers first (about 2 s of
    imports on an idle machine, far more on a busy one), serve imported FastAPI, uvicorn and its engine, and demo
    transformers, before looking at --out, the sampling flags, --port, --adapters or --rank."""
    import subprocess
    import sys

    (tmp_path / "adapters").mkdir()
    tiny, adapter, data = (str(files[k]) for k in ("tiny", "adapter", "data"))
    commands = [
        ["merge", "--model", tiny, "--adapter", adapter, "--out", tiny],
        ["quantize", "--model", tiny, "--out", tiny],
        ["combine", "--model", tiny, "--adapter", f"{adapter}=0", "--out", str(tmp_path / "c")],
        ["generate", "--model", tiny, "--temperature", "-1", "Hello"],
        ["train", "--model", tiny, "--data", data, "--max-length", "1"],
        ["eval", "--model", tiny, "--data", data, "--max-length", "1"],
        ["serve", "--model", tiny, "--adapters", str(tmp_path / "adapters"), "--port", "99999"],
        ["serve", "--model", tiny, "--adapters", str(tmp_path / "none"), "--port", "0"],
        ["demo", "--model", tiny, "--rank", "0"],
    ]
    script = (
        "import json, sys\n"
        "from lorakit.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    assert main(argv) == 2, argv\n"
        "    heavy = [m for m in ('transformers', 'fastapi', 'uvicorn', 'lorakit.serve.app') if m in sys.modules]\n"
        "    assert not heavy, (argv, heavy)\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(commands) and all(": error: " in line for line in lines), lines


# -- --help -------------------------------------------------------------------------------------------------------------
def test_every_subcommand_help_has_examples_and_every_option_help_and_its_default():
    """lorakit serve --help and lorakit demo --help had no examples, and demo's --prompt hid its default."""
    import argparse

    from lorakit.cli import SUBCOMMANDS, build_parser

    for name in SUBCOMMANDS:
        parser = build_parser(only=name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        assert sub.epilog and sub.epilog.startswith(("examples:", "example:")), name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"lorakit {name} {flag} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in action.help, f"lorakit {name} {flag} does not show its default {action.default!r}"
