"""Start-up structure of the CLI: help and input errors load neither torch nor the cost model.

Timings live in benchmarks/cli_latency.py; here the property that makes them small is checked:
which modules a command imports before it answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "matplotlib", "networkx", "autopar.cost_models.estimate", "autopar.planner.search")

PROBE = """
import json, sys
from autopar.cli.main import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}), file=sys.stderr)
"""


def _loaded(*args: str) -> dict:
    code = f"HEAVY = {HEAVY!r}\n" + PROBE
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args,code", [
    (["--help"], 0),
    (["plan", "--help"], 0),
    (["estimate", "--help"], 0),
    (["plan", "no-such-model"], 2),
    (["plan", "llama3-8b", "--gpu", "no-such-gpu"], 2),
    (["estimate", "llama3-8b", "--seq-len", "0", "--strategy", "tp=8"], 2),
    (["plan", "llama3-8b", "--nodes", "0"], 2),
])
def test_help_and_input_errors_stay_light(args, code):
    got = _loaded(*args)
    assert got["code"] in ((0, None) if code == 0 else (code,))
    assert got["heavy"] == [], f"{args} imported {got['heavy']}"


def test_each_command_is_found_without_importing_the_others():
    from autopar.cli.main import command_modules

    mods = command_modules()
    for name in ("plan", "estimate", "memory", "emit", "inspect", "profile", "validate", "experts"):
        assert name in mods, name
    assert mods["memory"] == mods["estimate"] == "autopar.cli.estimate_cmd"


@pytest.mark.parametrize("args,code", [(["plan", "no-such-model", "--json"], 2), (["--help"], 0)])
def test_the_process_entry_flushes_its_output_and_keeps_the_exit_code(args, code):
    """``python -m autopar`` leaves through ``os._exit`` (no interpreter teardown): what it printed
    must still reach the pipe, and the exit code must be the command's."""
    proc = subprocess.run([sys.executable, "-m", "autopar", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code
    if code:
        assert json.loads(proc.stdout)["exit_code"] == code
        assert proc.stderr.startswith("error: model:") and proc.stderr.count("\n") == 1
    else:
        assert proc.stdout.startswith("Usage:") and "plan" in proc.stdout


def test_the_process_entry_raises_the_gc_threshold_only_for_itself():
    """Tests and scripts call ``main(argv)``: they keep their interpreter, its GC settings and its
    environment (the process entry also caps OpenBLAS at one thread for plan/estimate/memory)."""
    import gc

    from autopar.cli.main import main

    before, env = gc.get_threshold(), dict(os.environ)
    with pytest.raises(SystemExit):
        main(["plan", "no-such-model"])
    assert gc.get_threshold() == before and dict(os.environ) == env


def test_a_warm_plan_reads_the_profiles_without_a_yaml_parser(tmp_path):
    """The hardware profiles' YAML is read back from the capture cache's JSON copies (profiles.hw)."""
    code = "HEAVY = ('yaml', 'torch')\n" + PROBE
    env = dict(os.environ, AUTOPAR_CACHE_DIR=str(tmp_path))
    args = ["plan", "llama-tiny", "--gpu", "cpu", "--nodes", "2", "--json"]
    runs = [subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                           env=env) for _ in range(2)]
    cold, warm = (json.loads(r.stderr.strip().splitlines()[-1]) for r in runs)
    assert cold["code"] in (0, None) and warm["code"] in (0, None)
    assert "yaml" in cold["heavy"] and warm["heavy"] == []
    assert json.loads(runs[0].stdout)["best"] == json.loads(runs[1].stdout)["best"]


def test_the_process_entry_skips_pydantic_plugin_discovery():
    """``python -m autopar`` builds its pydantic models without looking for plugins (cli.main._without_pydantic_plugins:
    no importlib.metadata, no scan of the installed distributions) unless PYDANTIC_DISABLE_PLUGINS says otherwise;
    the stand-in gives pydantic what it imports from its loader (fails when a pydantic release imports more)."""
    import re
    from pathlib import Path

    import pydantic.plugin._schema_validator as schema_validator

    assert re.findall(r"_loader import ([\w, ]+)", Path(schema_validator.__file__).read_text()) == ["get_plugins"]
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('importlib.metadata' in sys.modules, file=sys.stderr))\n"
            "sys.argv = ['autopar', 'plan', 'no-such-model']\n"
            "from autopar.cli.main import main\n"
            "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    for extra, metadata in (({}, "False"), ({"PYDANTIC_DISABLE_PLUGINS": "some-plugin"}, "True")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**env, **extra})
        assert proc.returncode == 2 and proc.stderr.startswith("error: model:"), proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == metadata, extra


def test_the_pydantic_loader_stand_in_steps_aside_for_any_other_name():
    """A pydantic release that imports more than ``get_plugins`` from its loader still runs: the stand-in hands
    such a name to the real loader (``cli.main._real_pydantic_loader``) instead of failing every command; the import
    system's own probes (``__spec__``...) do not bring the real loader in."""
    code = ("import sys\n"
            "from autopar.cli.main import _without_pydantic_plugins\n"
            "_without_pydantic_plugins()\n"
            "stand_in = sys.modules['pydantic.plugin._loader']\n"
            "import pydantic\n"
            "class A(pydantic.BaseModel):\n"
            "    x: int\n"
            "A(x=1)\n"
            "assert sys.modules['pydantic.plugin._loader'] is stand_in and 'importlib.metadata' not in sys.modules\n"
            "from pydantic.plugin._loader import _plugins  # only the real loader has it\n"
            "assert sys.modules['pydantic.plugin._loader'] is not stand_in\n")
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
