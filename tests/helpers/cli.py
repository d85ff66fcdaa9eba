"""A script's main() called in this process, as its command line would call it: for refusals, which need no process.

One subprocess test per script keeps the contract a user sees (exit code 2, one line, no traceback); the
many ways to be refused are checked here, in milliseconds instead of a Python start-up each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

HEAVY = ("torch", "ray", "mlflow", "optuna", "timm")
"""What takes seconds to import: a refusal or --help that loads none of it answers at once."""


@dataclass(frozen=True)
class Answer:
    """What main() returned (or exited with) and what it printed."""

    code: int | str | None
    out: str
    err: str


def call_main(
    main: Callable[[list[str]], int],
    *args: str,
    cwd: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str] | None = None,
) -> Answer:
    """main(args) run from `cwd` with `env` added: argparse's exit is an answer too. The environment is put back
    afterwards, as a process's end would (the scripts set defaults of their own in it)."""
    monkeypatch.chdir(cwd)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()  # what came before is not this call's
    before = dict(os.environ)
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)
    captured = capsys.readouterr()
    return Answer(code, captured.out, captured.err)


def one_line_refusal(answer: Answer, script: str) -> str:
    """The one error line of a refused call (exit code 2, nothing else on stderr, no traceback)."""
    assert answer.code == 2, answer.out[-2000:] + answer.err[-2000:]
    lines = answer.err.strip().splitlines()
    assert len(lines) == 1, answer.err
    assert lines[0].startswith(f"search/{script}: error: "), lines[0]
    assert "Traceback" not in answer.err
    return lines[0]


def heavy_modules_loaded(module: str, cwd: Path, *calls: list[str]) -> list[tuple[int | str | None, list[str]]]:
    """`module`'s main() (search.run, search.final) on each argument list in turn, in one fresh process from `cwd`:
    per call, its exit code and the HEAVY modules loaded by then. What a timing cannot say reliably on a busy
    machine, this does: nothing slow was imported."""
    probe = (
        "import contextlib, io, json, sys\n"
        f"from {module} import main\n"
        "answers = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            code = main(argv)\n"
        "        except SystemExit as exit_:\n"
        "            code = exit_.code\n"
        "    loaded = {name.split('.')[0] for name in sys.modules}\n"
        f"    answers.append([code, sorted(loaded & set({list(HEAVY)!r}))])\n"
        "print(json.dumps(answers))\n"
    )
    argv = json.dumps(list(calls))
    result = subprocess.run([sys.executable, "-c", probe, argv], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return [(code, heavy) for code, heavy in json.loads(result.stdout)]
