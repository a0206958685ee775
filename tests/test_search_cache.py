"""The search-result cache (planner/search_cache.py): hit and miss, what the key covers, who reads it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import search as search_mod
from autopar.planner import search_cache as sc
from autopar.planner.search import Constraints, search
from autopar.profiles import capture_cache

REPO = Path(__file__).resolve().parents[1]
# The memos the key leaves out: a new one is added here and in search_cache.MEMO_ATTRS on purpose
MEMOS = {"CostModel": {"_cache", "_z3"}, "OpTimer": {"hits"}}


@pytest.fixture(scope="module")
def cm():
    return build_cost_model(Inputs(model="llama-tiny", gpu="cpu", nodes=2))[0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("AUTOPAR_NO_CACHE", "AUTOPAR_SEARCH_CACHE"):
        monkeypatch.delenv(name, raising=False)
    capture_cache.set_enabled(True)
    monkeypatch.setattr(sc, "_console", True)   # what cli.main.main() turns on for the console command
    monkeypatch.setattr(sc, "_started_s", time.time())   # and when it started (sources older than that)
    return tmp_path / "cache" / sc.NAMESPACE


def _key(cm, gb=64, cons=None, top_k=5, exhaustive=False, best_only=False):
    return sc.call_key(cm, gb, cons or Constraints(), top_k, exhaustive, best_only)


def test_a_miss_stores_and_a_hit_answers_without_searching(cm, cache, monkeypatch):
    first = search(cm, 64)
    assert first.stats.from_cache is None and len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr(search_mod, "_fill", lambda sp: pytest.fail("a hit must not search"))
    again = search(cm, 64)
    assert again.stats.from_cache and again == dataclasses.replace(first, stats=again.stats)
    assert dataclasses.replace(again.stats, from_cache=None) == first.stats
    assert again.candidates[0].estimate is not first.candidates[0].estimate   # read back, not shared


def test_a_corrupted_entry_warns_once_and_searches_again(cm, cache, capsys):
    first = search(cm, 64)
    (entry,) = cache.glob("*.json")
    entry.write_text('{"searched_at": "x", "result": {"class": "Nope"')
    again = search(cm, 64)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: search cache entry") and "searching again" in err[0]
    assert again.stats.from_cache is None and again.candidates == first.candidates
    assert search(cm, 64).stats.from_cache   # rewritten


def test_an_entry_that_parses_but_does_not_validate_is_refused(cm, cache, capsys):
    first = search(cm, 64)
    (entry,) = cache.glob("*.json")
    text = entry.read_text()
    assert '"tp":1' in text.replace(" ", "")
    entry.write_text(re.sub(r'"tp":\s*1\b', '"tp": "eight"', text, count=1))
    again = search(cm, 64)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupted" in err[0] and "searching again" in err[0]
    assert again.stats.from_cache is None and again.candidates == first.candidates


def test_no_answer_is_stored_when_a_source_changed_after_the_command_started(cm, cache, monkeypatch):
    monkeypatch.setattr(sc, "_started_s", 0.0)   # every source file is newer: the process may run either version
    assert search(cm, 64).stats.from_cache is None
    assert not list(cache.glob("*.json"))


@pytest.mark.parametrize("switch", ["AUTOPAR_SEARCH_CACHE=0", "AUTOPAR_NO_CACHE=1", "--no-cache", "library"])
def test_switches_bypass_it(cm, cache, monkeypatch, switch):
    if "=" in switch:
        monkeypatch.setenv(*switch.split("="))
    elif switch == "--no-cache":
        monkeypatch.setattr(capture_cache, "_enabled", False)
    else:
        monkeypatch.setattr(sc, "_console", False)
    assert search(cm, 64).stats.from_cache is None and search(cm, 64).stats.from_cache is None
    assert not cache.exists()


def test_an_in_process_main_call_never_reads_or_writes_it(tmp_path, monkeypatch, capsys):
    from autopar.cli.main import main

    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    assert not sc._console
    for _ in range(2):
        main(["plan", "llama-tiny", "--gpu", "cpu", "--nodes", "2", "--json"])
        assert json.loads(capsys.readouterr().out)["stats"]["from_cache"] is None
    assert not (tmp_path / sc.NAMESPACE).exists()


# ----- the key ------------------------------------------------------------------------------------------
def test_the_memos_are_named_in_one_place_and_do_not_move_the_key(cm, cache):
    assert {k: set(v) for k, v in sc.MEMO_ATTRS.items()} == MEMOS
    before = _key(cm)
    cm.estimate(search(cm, 64).candidates[0].strategy)   # fills _cache, _z3 and the timer's hit counts
    assert cm._cache and _key(cm) == before


def _different(v):
    """A value of ``v``'s kind that differs from it (None where the walk recurses instead)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v * 2 + 1
    if isinstance(v, str):
        return v + "~"
    if isinstance(v, (tuple, list)):
        return type(v)([*v, v[-1]] if v else [0])
    if isinstance(v, (set, frozenset)):
        return type(v)([*v, "~"])
    if isinstance(v, dict):
        return {**v, "~": 0}
    return 0 if v is None else None


def _slots(obj, path, seen):
    """Every (object, attribute, path) the key must cover: autopar objects' attributes, recursively."""
    if id(obj) in seen or not type(obj).__module__.startswith("autopar.") or not hasattr(obj, "__dict__"):
        return
    seen.add(id(obj))
    skip = MEMOS.get(type(obj).__name__, set())
    for name, value in vars(obj).items():
        if name in skip:
            continue
        yield obj, name, f"{path}.{name}"
        if isinstance(value, (dict, list, tuple)):
            # the first few items of each container: the walk treats every item alike (keeps the test at seconds)
            for i, child in enumerate(list(value.values() if isinstance(value, dict) else value)[:3]):
                yield from _slots(child, f"{path}.{name}[{i}]", seen)
        else:
            yield from _slots(value, f"{path}.{name}", seen)


def unkeyed_fields(cm) -> list[str]:
    """The attributes of the cost model's state whose change leaves the key as it was."""
    base, missed = _key(cm), []
    for obj, name, path in _slots(cm, "cm", set()):
        old = getattr(obj, name)
        object.__setattr__(obj, name, _different(old))   # past pydantic's validation and frozen models
        try:
            if _key(cm) == base:
                missed.append(path)
        finally:
            object.__setattr__(obj, name, old)
    assert _key(cm) == base
    return missed


@pytest.mark.parametrize("kind", ["dense on CPU", "MoE with MLA on H100"])
def test_every_field_of_the_cost_model_moves_the_key(cm, cache, kind):
    if kind != "dense on CPU":
        cm = build_cost_model(Inputs(model="deepseek-tiny", gpu="h100-sxm", nodes=2))[0]
    assert unkeyed_fields(cm) == []


def test_the_field_check_fails_when_the_key_skips_a_field(cm, cache, monkeypatch):
    monkeypatch.setitem(sc.MEMO_ATTRS, "CostModel", sc.MEMO_ATTRS["CostModel"] | {"seq_len"})
    monkeypatch.setitem(sc.MEMO_ATTRS, "PricingContext", frozenset({"compile"}))
    assert unkeyed_fields(cm) == ["cm.seq_len", "cm.ctx.compile"]


def test_the_call_arguments_and_the_environment_move_the_key(cm, cache, monkeypatch):
    keys = [_key(cm), _key(cm, gb=128), _key(cm, top_k=1), _key(cm, exhaustive=True), _key(cm, best_only=True)]
    for f in dataclasses.fields(Constraints):
        cons = Constraints()
        object.__setattr__(cons, f.name, _different(getattr(cons, f.name)) if f.name != "fixed" else {"tp": 2})
        keys.append(_key(cm, cons=cons))
    monkeypatch.setenv("AUTOPAR_SOMETHING_NEW", "1")
    keys.append(_key(cm))
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == len(keys)
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", "/elsewhere")   # the cache's own switches: where, not what
    assert _key(cm) == keys[-1]


def test_a_state_it_cannot_write_means_no_caching(cm, cache, monkeypatch):
    monkeypatch.setattr(cm, "moe_load", lambda ep: (1.0, None))   # a closure over a routing trace, say
    assert _key(cm) is None
    assert search(cm, 64).stats.from_cache is None and not cache.exists()
    monkeypatch.setattr(cm, "moe_load", sc.enabled)   # a module-level function: named (its code is digested)
    assert _key(cm) is not None


def test_the_key_is_a_walk_of_the_graph(cm):
    a, b = [1.0], [1.0]
    assert sc.state([a, a]) != sc.state([a, b])   # shared objects written once
    assert sc.state({"x": 1, "y": 2}) == sc.state({"y": 2, "x": 1}) and sc.state({1, 2}) == sc.state({2, 1})
    assert sc.state(1) != sc.state(1.0) != sc.state("1") and sc.state((1,)) != sc.state([1])
    with pytest.raises(sc.Uncacheable):
        sc.state(object())


def test_an_edit_of_any_source_or_profile_changes_the_digest(tmp_path, monkeypatch):
    root = tmp_path / "autopar"
    for p in sc.source_files():
        dst = root / p.relative_to(sc._ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("x = 1\n")
    monkeypatch.setattr(sc, "_ROOT", root)

    def digest():
        sc.source_digest.cache_clear()
        return sc.source_digest()

    base = digest()
    for rel in ("tests/test_x.py", "planner/search.py", "cost_models/estimate.py", "profiles/hardware/h100-sxm.yaml"):
        with open(root / rel, "a") as fh:
            fh.write("\n# edited\n")
        changed = digest()
        assert (changed == base) == rel.startswith("tests/"), rel
        base = changed
    sc.source_digest.cache_clear()


def test_every_module_a_search_imports_is_digested():
    code = ("import sys\nfrom autopar.cost_models.session import Inputs, build_cost_model\n"
            "from autopar.planner.search import search\n"
            "cm = build_cost_model(Inputs(model='llama-tiny', gpu='cpu', nodes=2))[0]\nsearch(cm, 64)\n"
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) if n.startswith('autopar.') "
            "and getattr(m, '__file__', None)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    files = {str(p) for p in sc.source_files()}
    assert [f for f in out.stdout.split() if f not in files] == []


# ----- the console command ------------------------------------------------------------------------------
def _plan(cache_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("AUTOPAR_NO_CACHE", "AUTOPAR_SEARCH_CACHE")}
    full.update(AUTOPAR_CACHE_DIR=str(cache_dir), **(env or {}))
    args = [sys.executable, "-m", "autopar", "plan", "llama-tiny", "--gpu", "cpu", "--nodes", "2", *extra]
    return subprocess.Popen(args, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(cache_dir: Path, *extra: str, env: dict | None = None) -> str:
    proc = _plan(cache_dir, *extra, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


STATS = re.compile(r"searched .*?(?=best strategy)", re.S)   # the stats line (a hit's note may wrap it)


@pytest.mark.slow
def test_the_console_answers_from_the_cache_as_the_search_did(tmp_path):
    cache_dir = tmp_path / "cache"

    def miss_then_hit(*flags: str) -> list[str]:
        shutil.rmtree(cache_dir / sc.NAMESPACE, ignore_errors=True)
        return [_run(cache_dir, *flags) for _ in range(2)]

    text0, text1 = miss_then_hit()
    assert STATS.sub("", text0) == STATS.sub("", text1) and "from the search cache" not in text0
    line0, line1 = (" ".join(STATS.search(t).group(0).split()) for t in (text0, text1))
    assert line1.startswith(line0 + " (from the search cache, searched ") and line1.endswith("searches again)")
    json0, json1 = map(json.loads, miss_then_hit("--json"))
    assert json0["stats"].pop("from_cache") is None and json1["stats"].pop("from_cache")
    assert json0 == json1
    shutil.rmtree(cache_dir / sc.NAMESPACE)
    outs = [_run(cache_dir, "--out", str(tmp_path / f"{i}.json")) for i in range(2)]   # a miss, then a hit
    assert "from the search cache" in " ".join(outs[1].split())
    plans = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    for p in plans:
        p["provenance"].pop("created_at")
    assert plans[0] == plans[1]
    for env, flag in (({"AUTOPAR_SEARCH_CACHE": "0"}, ()), ({}, ("--no-cache",))):
        assert json.loads(_run(cache_dir, "--json", *flag, env=env))["stats"]["from_cache"] is None


@pytest.mark.slow
def test_two_concurrent_plans_share_the_search_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    _run(cache_dir, "--json", "--max-tp", "1")   # the capture cached: both runs below search at once
    procs = [_plan(cache_dir, "--json"), _plan(cache_dir, "--json")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all("warning" not in e for _, e in outs)
    best = [json.loads(o)["best"] for o, _ in outs]
    assert best[0] == best[1]
    assert len(list((cache_dir / sc.NAMESPACE).glob("*.json"))) == 2 and not list((cache_dir / sc.NAMESPACE).glob(".*"))
    assert json.loads(_run(cache_dir, "--json"))["best"] == best[0]
