"""Routing traces: format, validation, synthetic generator, recording with router hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from autopar.cli.main import main
from autopar.errors import InputError
from autopar.profiles.routing import RoutingTrace, counts_from_routes, record_trace, synthetic_trace


# ----- a tiny MoE written to the router contract (forward -> (topk_idx, topk_weight)) ---------
class TopKRouter(nn.Module):
    def __init__(self, hidden: int, num_experts: int, topk: int):
        super().__init__()
        self.topk = topk
        self.gate = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, x):
        weight, idx = torch.topk(self.gate(x).softmax(-1), self.topk, dim=-1)
        return idx, weight


class TinyMoEBlock(nn.Module):
    def __init__(self, hidden: int, num_experts: int, topk: int):
        super().__init__()
        self.router = TopKRouter(hidden, num_experts, topk)
        self.experts = nn.Parameter(torch.randn(num_experts, hidden, hidden) * 0.3)

    def forward(self, x):                       # x [b, s, h]
        flat = x.reshape(-1, x.shape[-1])
        idx, weight = self.router(flat)
        out = torch.einsum("th,tkhg->tg", flat, self.experts[idx] * weight[..., None, None])
        return x + out.reshape_as(x)


class TinyMoE(nn.Module):
    def __init__(self, vocab=50, hidden=16, layers=3, num_experts=6, topk=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleDict({str(i): TinyMoEBlock(hidden, num_experts, topk) for i in range(layers)})

    def forward(self, tokens):
        x = self.emb(tokens)
        for block in self.layers.values():
            x = block(x)
        return x


def _routes_by_hand(model, tokens):
    """Run the blocks manually and collect each router's topk_idx (the ground truth)."""
    x, routes = model.emb(tokens), []
    for block in model.layers.values():
        routes.append(block.router(x.reshape(-1, x.shape[-1]))[0].numpy())
        x = block(x)
    return routes


# ----- counting ---------------------------------------------------------------------------------
def test_counts_match_brute_force():
    rng = np.random.default_rng(0)
    routes = [np.stack([rng.choice(5, 2, replace=False) for _ in range(40)]) for _ in range(3)]
    load, trans = counts_from_routes(routes, 5)
    for l in range(3):
        assert load[l].tolist() == np.bincount(routes[l].ravel(), minlength=5).tolist()
    for l in range(2):
        want = np.zeros((5, 5), dtype=int)
        for t in range(40):
            for i in routes[l][t]:
                for j in routes[l + 1][t]:
                    want[i, j] += 1
        assert (trans[l] == want).all()


def test_record_trace_hooks_routers():
    torch.manual_seed(0)
    model = TinyMoE()
    tokens = torch.randint(0, 50, (4, 10))
    trace = record_trace(model, tokens)
    load, trans = counts_from_routes(_routes_by_hand(model, tokens), 6)
    assert (trace.num_layers, trace.num_experts, trace.topk, trace.tokens) == (3, 6, 2, 40)
    assert (trace.load_array == load).all() and (trace.transitions_array == trans).all()
    assert trace.meta["routers"] == ["layers.0.router", "layers.1.router", "layers.2.router"]
    batched = record_trace(model, tokens, batch_size=1)       # per-batch hooks accumulate
    assert (batched.transitions_array == trans).all()


def test_record_trace_without_routers_is_an_input_error():
    with pytest.raises(InputError, match="TopKRouter"):
        record_trace(nn.Linear(4, 4), torch.zeros(2, 4))


# ----- synthetic generator ------------------------------------------------------------------------
def test_synthetic_totals_and_determinism():
    a = synthetic_trace(16, 4, 2, 1000, skew=1.0, affinity=0.5, seed=3)
    b = synthetic_trace(16, 4, 2, 1000, skew=1.0, affinity=0.5, seed=3)
    assert (a.load_array.sum(axis=1) == 2000).all()
    assert (a.transitions_array.sum(axis=(1, 2)) == 4000).all()
    assert a.load == b.load and a.transitions == b.transitions
    assert synthetic_trace(16, 4, 2, 1000, seed=4).load != a.load


def test_synthetic_affinity_one_has_a_single_successor():
    tr = synthetic_trace(12, 3, 1, 2000, skew=0.5, affinity=1.0, seed=0)
    C = tr.transitions_array
    assert ((C > 0).sum(axis=2) <= 1).all()                    # each expert feeds one expert
    # the successor keeps popularity: layer l+1 loads are a permutation of layer l loads
    assert sorted(tr.load[1]) == sorted(tr.load[0])


def test_synthetic_affinity_zero_is_spread_and_skew_orders_load():
    tr = synthetic_trace(16, 2, 1, 20000, skew=1.0, affinity=0.0, seed=0)
    share = tr.transitions_array.max(axis=2).sum() / tr.transitions_array.sum()
    assert share < 0.35
    load = np.sort(tr.load_array[0])[::-1]
    assert load[0] > 4 * load[-1]                               # Zipf 1: rank 1 vs rank 16 ~ 16x
    flat = synthetic_trace(16, 1, 1, 20000, skew=0.0, seed=0).load_array[0]
    assert flat.max() < 1.2 * flat.mean()


@pytest.mark.parametrize("kwargs, match", [
    (dict(topk=20), "topk"), (dict(skew=-1.0), "skew"), (dict(affinity=1.5), "affinity"), (dict(tokens=0), "tokens"),
])
def test_synthetic_rejects_bad_parameters(kwargs, match):
    args = dict(experts=8, layers=2, topk=2, tokens=100) | kwargs
    with pytest.raises(InputError, match=match):
        synthetic_trace(**args)


# ----- file format ------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path):
    tr = synthetic_trace(8, 3, 2, 300, affinity=0.5, seed=1)
    tr.save(tmp_path / "t.json")
    back = RoutingTrace.load_file(tmp_path / "t.json")
    assert back.model_dump() == tr.model_dump() and back.format_version == 1
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]     # no temp file left behind


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def _good() -> dict:
    return json.loads(synthetic_trace(4, 3, 1, 50, seed=0).model_dump_json())


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(load=d["load"][:2]), "load has shape"),
    (lambda d: d.update(transitions=d["transitions"][:1]), "transitions has shape"),
    (lambda d: d["transitions"][0].pop(), "transitions has shape"),
    (lambda d: d["load"][1].__setitem__(2, -3), r"load\[1\]\[2\] = -3 is negative"),
    (lambda d: d["transitions"][0][1].__setitem__(0, -1), "is negative"),
    (lambda d: d.update(format_version=7), "format_version"),
    (lambda d: d.update(num_experts="many"), "num_experts"),
])
def test_bad_traces_give_one_line_errors(tmp_path, mutate, match):
    data = _good()
    mutate(data)
    with pytest.raises(InputError, match=match) as err:
        RoutingTrace.load_file(_write(tmp_path, data))
    assert "\n" not in err.value.message


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        RoutingTrace.load_file(tmp_path / "nope.json")
    with pytest.raises(InputError, match="not valid JSON"):
        RoutingTrace.load_file(_write(tmp_path, "{oops"))


# ----- CLI ------------------------------------------------------------------------------------------
def test_cli_synthetic_trace(tmp_path, capsys):
    out = tmp_path / "t.json"
    main(["trace-routing", "--synthetic", "--experts", "8", "--layers", "3", "--topk", "2", "--tokens", "400",
          "--skew", "0.8", "--affinity", "0.7", "--seed", "5", "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    tr = RoutingTrace.load_file(out)
    assert tr.model_dump() == synthetic_trace(8, 3, 2, 400, skew=0.8, affinity=0.7, seed=5).model_dump()
    assert summary["num_experts"] == 8 and summary["tokens"] == 400


def test_cli_trace_of_builtin_moe_model(tmp_path):
    out = tmp_path / "m.json"
    main(["trace-routing", "moe-tiny", "--tokens", "256", "--seq-len", "32", "--out", str(out)])
    tr = RoutingTrace.load_file(out)
    assert tr.tokens == 256 and tr.topk == 2 and tr.num_experts == 8
    assert (tr.load_array.sum(axis=1) == 512).all()


def test_cli_trace_from_token_file(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5 6 7 8\n9 10 11 12 13 14 15 16\n")
    out = tmp_path / "m.json"
    main(["trace-routing", "moe-tiny", "--tokens", str(ids), "--seq-len", "8", "--out", str(out)])
    assert RoutingTrace.load_file(out).tokens == 16


@pytest.mark.parametrize("argv, match", [
    (["trace-routing", "--out", "x.json"], "MODEL"),
    (["trace-routing", "--synthetic", "--tokens", "abc", "--out", "x.json"], "token count"),
    (["trace-routing", "--synthetic", "--experts", "4", "--topk", "8", "--out", "x.json"], "topk"),
    (["trace-routing", "llama-tiny", "--out", "x.json"], "no MoE layers"),
])
def test_cli_errors_exit_2(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and match in err and err.count("\n") == 1


def test_convert_trace_script(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "convert_trace.py"
    spec = importlib.util.spec_from_file_location("convert_trace", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    csv = tmp_path / "routes.csv"
    csv.write_text("layer,token,expert\n3,0,1\n3,0,2\n3,1,0\n3,1,2\n5,0,2\n5,0,3\n5,1,1\n5,1,0\n")
    mod.main([str(csv), "--out", str(tmp_path / "t.json"), "--experts", "4"])
    tr = RoutingTrace.load_file(tmp_path / "t.json")
    assert tr.topk == 2 and tr.tokens == 2 and tr.meta["layer_ids"] == [3, 5]
    assert tr.transitions[0] == [[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
