"""The on-disk capture cache: miss, hit, a corrupted entry, --no-cache, concurrent CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autopar.cost_models import templates as tpl
from autopar.cost_models.template_cache import NAMESPACE
from autopar.profiles import capture_cache
from autopar.profiles.intake import preset


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTOPAR_NO_CACHE", raising=False)
    capture_cache.set_enabled(True)
    tpl._cached.cache_clear()  # the in-process cache would hide the disk
    yield tmp_path / "cache"
    tpl._cached.cache_clear()


def _entries(root: Path) -> list[Path]:
    return sorted((root / NAMESPACE).glob("*.json")) if (root / NAMESPACE).is_dir() else []


def _build(spec, seq=64):
    tpl._cached.cache_clear()
    return tpl.build_templates(spec, seq, "fp32")


def test_miss_then_hit_without_capturing(cache, monkeypatch):
    spec = preset("llama-tiny")
    first = _build(spec)
    assert len(_entries(cache)) == 1
    calls = []
    real = tpl._capture
    monkeypatch.setattr(tpl, "_capture", lambda *a: calls.append(a) or real(*a))  # a hit must not capture
    again = _build(spec)
    assert calls == [] and again == first
    _build(spec, seq=32)  # another sequence length is another key: a miss
    assert len(calls) == 1


def test_key_covers_config_dtype_and_code(cache):
    a = capture_cache.entry_path(NAMESPACE, {"spec": {"hidden": 64}, "seq_len": 64, "dtype": "fp32"})
    b = capture_cache.entry_path(NAMESPACE, {"spec": {"hidden": 128}, "seq_len": 64, "dtype": "fp32"})
    c = capture_cache.entry_path(NAMESPACE, {"spec": {"hidden": 64}, "seq_len": 64, "dtype": "bf16"})
    assert len({a, b, c}) == 3
    assert len(capture_cache.code_digest()) == 16


# Modules a capture imports that do not shape its result: the spec (built by intake) is the key itself,
# the GPU profile prices templates without changing them, the rest stores them or names errors.
NOT_CAPTURE_SOURCES = {"__init__.py", "core/__init__.py", "cost_models/__init__.py", "profiles/__init__.py",
                       "errors.py", "fileio.py", "core/model_spec.py", "core/gpu.py", "profiles/intake.py",
                       "profiles/capture_cache.py"}
_IMPORTED = """
import json, sys
from pathlib import Path
from autopar.cost_models import templates
from autopar.profiles.intake import preset
for name in ("llama-tiny", "moe-tiny", "gpt-tiny", "gpt-small"):  # gpt-small: at reduced depth
    templates._capture(preset(name).model_dump_json(), 32, "fp32", True)
dynamo = "torch._dynamo" in sys.modules
heavy = [m for m in ("sympy", "torch.fx.experimental.symbolic_shapes") if m in sys.modules]
root = Path(sys.modules["autopar"].__file__).resolve().parent
files = [Path(m.__file__).resolve() for n, m in list(sys.modules.items()) if n.startswith("autopar") and m.__file__]
import torch, torch._dynamo  # the shim is gone: the real dynamo loads and meta references still run
torch.zeros(2, device="meta").float().mean()
assert type(torch._dynamo).__name__ == "module" and torch._dynamo.disable.__module__ != "autopar.profiles.dynamo_shim"
print(json.dumps({"files": sorted(p.relative_to(root).as_posix() for p in files), "dynamo": dynamo, "heavy": heavy}))
"""


def test_every_module_a_capture_imports_is_in_the_digest():
    """... and a capture does not import torch._dynamo (``profiles.dynamo_shim``: seconds of a cold plan)."""
    out = subprocess.run([sys.executable, "-c", _IMPORTED], capture_output=True, text=True, timeout=300, check=True)
    probe = json.loads(out.stdout)
    assert not probe["dynamo"] and not probe["heavy"]   # nor sympy (profiles.dynamo_shim's stand-ins)
    imported = set(probe["files"])
    assert {"profiles/models/layers.py", "profiles/graph.py"} <= imported   # the probe did capture
    missing = imported - set(capture_cache.capture_sources()) - NOT_CAPTURE_SOURCES
    assert not missing, f"add to capture_cache.CAPTURE_SOURCES: {sorted(missing)}"


def test_digest_is_read_once_and_covers_model_sources(tmp_path, monkeypatch):
    root = Path(capture_cache.__file__).resolve().parents[1]
    for rel in capture_cache.capture_sources():   # a copy of the sources to edit
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((root / rel).read_bytes())
    assert {"profiles/models/transformer.py", "profiles/hf_families.py"} <= set(capture_cache.capture_sources())
    monkeypatch.setattr(capture_cache, "_ROOT", tmp_path)
    capture_cache.code_digest.cache_clear()
    try:
        first = capture_cache.code_digest()
        (tmp_path / "profiles/models/transformer.py").write_text("# edited while a command runs\n")
        assert capture_cache.code_digest() == first      # once per process: a write keeps the read's digest
        capture_cache.code_digest.cache_clear()
        edited = capture_cache.code_digest()              # the next process sees the edit
        assert edited != first
        (tmp_path / "profiles/hf_families.py").write_text("# edited\n")
        capture_cache.code_digest.cache_clear()
        assert capture_cache.code_digest() != edited
    finally:
        monkeypatch.undo()
        capture_cache.code_digest.cache_clear()


def test_corrupted_entry_is_rebuilt_with_one_warning(cache, capsys):
    spec = preset("llama-tiny")
    first = _build(spec)
    (entry,) = _entries(cache)
    entry.write_text('{"truncated": [')
    capsys.readouterr()
    again = _build(spec)
    err = capsys.readouterr().err.strip().splitlines()
    assert again == first
    assert len(err) == 1 and err[0].startswith("warning: capture cache entry") and "corrupted" in err[0]
    assert isinstance(json.loads(entry.read_text()), list)  # rewritten whole
    entry.write_text(json.dumps([{"name": "x"}]))  # valid JSON, wrong shape: also rebuilt
    assert _build(spec) == first


def test_no_cache_reads_and_writes_nothing(cache, monkeypatch):
    monkeypatch.setenv("AUTOPAR_NO_CACHE", "1")
    _build(preset("gpt-tiny"))
    assert _entries(cache) == []


def test_unwritable_cache_dir_warns_and_still_answers(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(blocker / "sub"))
    tpl._cached.cache_clear()
    assert tpl.build_templates(preset("gpt-tiny"), 32, "fp32")
    assert "capture cache not written" in capsys.readouterr().err
    tpl._cached.cache_clear()


def _plan(cache_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, AUTOPAR_CACHE_DIR=str(cache_dir))
    args = [sys.executable, "-m", "autopar", "plan", "llama-tiny", "--gpu", "cpu", "--nodes", "2", "--json", *extra]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_plans_share_one_cache(tmp_path):
    cache_dir = tmp_path / "shared-cache"
    procs = [_plan(cache_dir), _plan(cache_dir)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert all("warning" not in err for _, err in outs)
    best = [json.loads(out)["best"]["strategy"] for out, _ in outs]
    assert best[0] == best[1]
    entries = _entries(cache_dir)
    assert len(entries) == 1 and not list((cache_dir / NAMESPACE).glob(".*"))  # no temp files left behind
    third = _plan(cache_dir, "--no-cache")
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0 and json.loads(out)["best"]["strategy"] == best[0]


# ----- JSON copies of the hardware-profile YAML (profiles.hw._parse_yaml) ------------------------
def _hardware_yaml() -> list[Path]:
    from autopar.profiles import hw

    return sorted(hw._hardware_dir().glob("*.yaml"))


def test_yaml_profiles_are_read_back_equal_from_their_json_copies(cache, monkeypatch):
    import yaml

    from autopar.profiles import hw

    files = _hardware_yaml()
    parsed = {p: hw._read_mapping(p, "gpu") for p in files}   # misses: parsed and copied
    assert len(list((cache / hw.YAML_NAMESPACE).glob("*.json"))) == len({p.read_text() for p in files})
    monkeypatch.setattr(hw, "_yaml_load", lambda *a: pytest.fail("a copied file was parsed again"))
    monkeypatch.setattr(capture_cache, "code_digest", lambda: "edited capture code")  # not part of the key
    for p in files:
        again = hw._read_mapping(p, "gpu")
        assert again == parsed[p] == yaml.safe_load(p.read_text())
        again["mutated"] = 1                              # each read is a fresh object
        assert "mutated" not in hw._read_mapping(p, "gpu")


def test_yaml_copy_is_keyed_by_the_text_and_skipped_for_non_json_data(cache, tmp_path):
    from autopar.profiles import hw

    f = tmp_path / "g.yaml"
    f.write_text("name: a\npeak: 1\n")
    assert hw._read_mapping(f, "gpu") == {"name": "a", "peak": 1}
    f.write_text("name: a\npeak: 2\n")                      # an edit is another key
    assert hw._read_mapping(f, "gpu") == {"name": "a", "peak": 2}
    f.write_text("name: a\nmeasured: 2026-11-26\n1: x\n")  # a date and an int key: no JSON copy
    first = hw._read_mapping(f, "gpu")
    assert hw._read_mapping(f, "gpu") == first and 1 in first
    assert len(list((cache / hw.YAML_NAMESPACE).glob("*.json"))) == 2


def test_corrupted_yaml_copy_is_parsed_again_with_one_warning(cache, capsys):
    from autopar.profiles import hw

    path = _hardware_yaml()[0]
    first = hw._read_mapping(path, "gpu")
    (entry,) = (cache / hw.YAML_NAMESPACE).glob("*.json")
    entry.write_text('{"truncated": ')
    capsys.readouterr()
    assert hw._read_mapping(path, "gpu") == first
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupted" in err[0] and err[0].endswith("parsing the YAML again")
    assert json.loads(entry.read_text()) == first           # rewritten whole


def test_yaml_copies_obey_no_cache_and_a_read_only_cache_dir_stays_silent(cache, tmp_path, monkeypatch, capsys):
    from autopar.profiles import hw

    monkeypatch.setenv("AUTOPAR_NO_CACHE", "1")
    hw._read_mapping(_hardware_yaml()[0], "gpu")
    assert not cache.exists()
    monkeypatch.delenv("AUTOPAR_NO_CACHE")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(blocker / "sub"))
    assert hw._read_mapping(_hardware_yaml()[0], "gpu")
    assert capsys.readouterr().err == ""
