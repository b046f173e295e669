"""CLI helpers the tests share: reading what ``lorakit.cli.main`` printed when it refused a command."""

from __future__ import annotations


def cli_error(capsys, code: int) -> str:
    """The one stderr line of a refused command: ``code`` (main's exit status) must be 2 and stderr must hold no
    traceback. Returns the last stderr line."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]
