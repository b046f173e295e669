"""The twenty-first session's own fixes (the lead's; helpers' are in the other test_followups_21_* files)."""

from __future__ import annotations

import io

import pytest

from lorakit.models import embedded


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _transformers_bars_on():
    """Each test starts with transformers' bars on, as a new process has them (an in-process lorakit train run of
    another test in this worker turns them off for the rest of the process), and leaves them as it found them."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()


def _draw_the_loaders_bars():
    """What a conversion draws: the GGUF loader's plain tqdm over tensors, and transformers' own (logging) bar."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    for _ in gguf_loader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
        pass
    for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
        pass


def test_the_embedded_models_conversion_draws_no_bars_into_a_log_file(monkeypatch):
    """A first run in a log file (nohup, CI) held one line of ~270 overwritten tqdm bars from transformers' GGUF
    loader, then two more from loading and saving: with standard error not a terminal, none are drawn."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    before = gguf_loader.tqdm
    with embedded._bars_off_in_logs():
        _draw_the_loaders_bars()
    assert log.getvalue() == ""
    assert gguf_loader.tqdm is before and hf_logging.is_progress_bar_enabled()  # given back as they were


def test_the_embedded_models_conversion_keeps_its_bars_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with embedded._bars_off_in_logs():
        _draw_the_loaders_bars()
    assert "Converting and de-quantizing GGUF tensors" in terminal.getvalue() and "Loading weights" in terminal.getvalue()


def test_a_user_who_turned_transformers_bars_off_keeps_them_off(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr("sys.stderr", io.StringIO())
    hf_logging.disable_progress_bar()
    try:
        with embedded._bars_off_in_logs():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_the_conversion_says_how_long_it_took(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(embedded, "_convert_quietly", lambda source, out, name: None)
    embedded._convert(tmp_path / "model.gguf", tmp_path / "out", "smollm2-135m")
    assert capsys.readouterr().err.startswith("lorakit: converted the embedded model in ")
