"""Time from command to printed plan for a 7B-class transformers config, capture and search apart.

    python benchmarks/hf_plan_time.py [CONFIG_DIR_OR_JSON]

Default model: Mistral-7B's public config (``profiles/hf_presets.json``, ``mistral-7b``) written
to a temporary folder and planned through ``--hf``, i.e. the transformers module itself is
built on the meta device and captured (not the built-in catalog). Prints, on this machine:

- ``end_to_end_s``: ``autopar plan DIR --hf --no-cache --json`` in a fresh process (imports,
  intake, capture, pricing, search, printing), wall clock; ``end_to_end_cpu_s`` its CPU time
  (user + system of the child: the figure to compare on a shared machine);
- ``capture_s``: graph capture alone (``profiles.graph.capture``) in this process, after a
  warm-up capture so that imports are not counted;
- ``search_s``: the planner's search alone (``stats.search_time_s`` of that plan).

Needs transformers. Figures go to docs/benchmarks.md with this command as their source.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AUTOPAR = Path(sys.executable).with_name("autopar")
SEQ, GBS = 4096, 512


def _config_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from autopar.profiles.intake import hf_presets

    d = Path(tempfile.mkdtemp()) / "mistral-7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_presets()["mistral-7b"]))
    return d


def _end_to_end(path: Path) -> tuple[float, float, dict]:
    cpu0 = _child_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run([str(AUTOPAR), "plan", str(path), "--hf", "--no-cache", "--json", "--seq-len", str(SEQ),
                           "--global-batch", str(GBS), "--nodes", "2"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"autopar plan failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return wall, _child_cpu() - cpu0, json.loads(proc.stdout)


def _child_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _capture(path: Path) -> float:
    from autopar.profiles.graph import capture
    from autopar.profiles.intake import resolve_model

    spec = resolve_model(f"hf:{path}")
    capture(spec, 128, 1, "bf16")  # warm-up: imports and first-call costs
    return capture(spec, SEQ, 1, "bf16").capture_time_s


def main() -> None:
    path = _config_dir(sys.argv[1] if len(sys.argv) > 1 else None)
    wall, cpu, plan = _end_to_end(path)
    out = {"model": str(path), "seq_len": SEQ, "global_batch": GBS, "cluster": "2 x 8 h100-sxm",
           "end_to_end_s": round(wall, 2), "end_to_end_cpu_s": round(cpu, 2), "capture_s": round(_capture(path), 2),
           "search_s": round(plan["stats"]["search_time_s"], 2), "best": plan["best"]["strategy_string"],
           "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
