"""How well a CPU profile predicts layers it never timed (prints figures, asserts nothing).

1. ``autopar profile`` a small GPT on this CPU (one thread, fp32): its ops and the sweeps
   give the fitted curves.
2. For GPT blocks with other hidden sizes, sequence lengths and batch sizes, predict forward +
   backward time of one block with the cost model (``price_layer`` on the profile; no op of
   these shapes is in the measured table, checked) and measure the real block (``Block``
   forward + ``autograd.grad`` w.r.t. its input and parameters, the profiler's clock, median).
3. Print per shape and the median absolute error. Target: <= 15%.

    python benchmarks/profile_accuracy.py [--model gpt-small] [--budget-s 60] [--profile FILE]

``--profile FILE`` skips step 1 and uses an existing profile (e.g. the shipped ``cpu``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.core.gpu import GpuProfile
from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.cost_models.compute import OpTimer
from autopar.cost_models.layer_cost import PricingContext, price_layer
from autopar.cost_models.templates import build_templates
from autopar.profiles.hw import load_gpu_profile
from autopar.profiles.intake import preset
from autopar.profiles.models import build_model
from autopar.profiles.profiler import profile_device
from autopar.profiles.profiler_timing import Clock, engine_overhead, measure

# (what varies, hidden, heads, seq, batch): none of these blocks is the profiled gpt-small's
# (hidden 256, seq 256, batch 1).
SHAPES = [
    ("hidden", 192, 4, 256, 1), ("hidden", 384, 6, 256, 1), ("hidden", 640, 10, 256, 1),
    ("seq", 256, 8, 96, 1), ("seq", 256, 8, 384, 1), ("seq", 256, 8, 640, 1),
    ("batch", 256, 8, 256, 2), ("batch", 256, 8, 256, 3), ("batch", 256, 8, 128, 6),
    ("all", 320, 5, 192, 3), ("all", 512, 8, 160, 2), ("all", 768, 12, 128, 1),
]


def gpt(hidden: int, heads: int, seq: int) -> ModelSpec:
    return ModelSpec(name=f"gpt-h{hidden}", family="gpt", hidden=hidden, layers=1, heads=heads,
                     ffn_hidden=4 * hidden, vocab=512, max_seq_len=seq, source="benchmark")


def predict(profile: GpuProfile, spec: ModelSpec, seq: int, batch: int) -> tuple[float, int]:
    """(forward + backward seconds of one block from the cost model, exact op hits)."""
    timer = OpTimer(gpu=profile, dtype="fp32")
    cluster = ClusterSpec(gpu="cpu", nodes=1, gpus_per_node=1, intra_node=LinkClass(bw_gbps=1, latency_s=0),
                          inter_node=LinkClass(bw_gbps=1, latency_s=0))
    ctx = PricingContext(cluster=cluster, timer=timer, dtype_bytes=4, hidden=spec.hidden, seq_len=seq)
    block = next(t for t in build_templates(spec, seq, "fp32", fuse=False) if t.kind == "block")
    s = Strategy.parse(f"dp=1,mbs={batch}").resolve(1, batch)
    c = price_layer(block, s, ctx)
    return c.fwd_s + c.bwd_s, timer.hits["measurement"]


def measure_block(spec: ModelSpec, seq: int, batch: int, clock: Clock, engine: float) -> float:
    """Median forward + backward seconds of the real block (one autograd start-up subtracted:
    a training step pays it once, not per layer)."""
    torch.manual_seed(0)
    block = build_model(spec, "cpu").layers["0"].train()
    x = torch.randn(batch, seq, spec.hidden, requires_grad=True)
    wrt = [x, *block.parameters()]
    g = torch.randn(batch, seq, spec.hidden)

    def fwd_bwd():
        return torch.autograd.grad(block(x), wrt, g)

    return measure(fwd_bwd, clock, 3.0, rel_tol=0.02).median_s - engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-small")
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None, help="write the fresh profile here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.profile:
        profile = load_gpu_profile(args.profile)
        print(f"profile: {args.profile} ({profile.meta.get('device')}, {profile.meta.get('date')})")
    else:
        t0 = time.perf_counter()
        spec = preset(args.model)
        run = profile_device(spec, spec.max_seq_len, 1, "fp32", "cpu", 1, args.budget_s, "cpu-bench",
                             f"benchmarks/profile_accuracy.py --model {args.model}", lambda m: None)
        profile = GpuProfile.model_validate(run.profile)
        print(f"profiled {args.model} (seq {spec.max_seq_len}) in {time.perf_counter() - t0:.1f} s")
        if args.save:
            args.save.write_text(json.dumps(run.profile, indent=1))
    clock = Clock("cpu", 1)
    engine = engine_overhead(clock)
    print(f"{'varies':7} {'hidden':>6} {'seq':>5} {'batch':>5} {'predicted':>11} {'measured':>11} {'error':>8}")
    errors = []
    for what, hidden, heads, seq, batch in SHAPES:
        spec = gpt(hidden, heads, seq)
        pred, hits = predict(profile, spec, seq, batch)
        meas = measure_block(spec, seq, batch, clock, engine)
        err = (pred - meas) / meas
        errors.append(abs(err))
        note = f"  ({hits} exact op hits)" if hits else ""
        print(f"{what:7} {hidden:6d} {seq:5d} {batch:5d} {pred * 1e3:8.2f} ms {meas * 1e3:8.2f} ms "
              f"{100 * err:+7.1f}%{note}", flush=True)
    print(f"median absolute error {100 * statistics.median(errors):.1f}% over {len(errors)} shapes "
          f"(max {100 * max(errors):.1f}%); target <= 15%")


if __name__ == "__main__":
    main()
