"""``autopar ... | head``: a reader that leaves early ends the command quietly with exit 0 (cli.main.PipeGuard);
click turned the BrokenPipeError into a silent exit 1 before."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args", [["--help"], ["estimate", "gpt-tiny", "--gpu", "cpu", "--strategy", "dp=1"]])
def test_closed_stdout_exits_zero_quietly(args):
    p = subprocess.Popen([sys.executable, "-m", "autopar", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()   # the reader is gone before the first write: every write hits a broken pipe
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and err == b""


def test_errors_still_exit_two_with_their_line():
    p = subprocess.run([sys.executable, "-m", "autopar", "estimate", "gpt-tiny", "--gpu", "nonexistent",
                        "--strategy", "dp=1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: gpu:") and "Traceback" not in p.stderr
