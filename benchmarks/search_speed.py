"""Planning time of `autopar plan` on four large jobs (issue 5 targets, on the 2-core CI machine).

Prints, per job, the cost-model build time (graph capture + templates, from the capture cache when warm), the
search time (enumeration, bounds, pricing, stage-partition DP, exact estimates of the top 5)
as wall and CPU time (they differ only when other work shares the cores), the search
statistics, and the winner. Targets apply to the search time (judged on CPU time, which
equals wall time on an otherwise idle machine):

    GPT-3 175B on 1,024 A100-80GB      <= 2 s
    GPT 1T on 3,072 A100-80GB          <= 5 s
    Mixtral-8x22B on 256 H100 (EP)     <= 5 s
    DeepSeek-V3 on 2,048 H800          <= 10 s

Run: .venv/bin/python benchmarks/search_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import time

from autopar.core.model_spec import ModelSpec
from autopar.cost_models.estimate import CostModel
from autopar.cost_models.session import default_global_batch, default_seq_len
from autopar.cost_models.templates import build_templates
from autopar.planner.search import search
from autopar.profiles.hw import default_cluster_for_gpu, load_gpu_profile
from autopar.profiles.intake import preset

# GPT 1T: Narayanan et al. SC21 Table 1, last row (128 layers, h = 25600, 160 heads).
GPT_1T = ModelSpec(family="gpt", name="gpt-1t", hidden=25600, layers=128, heads=160, ffn_hidden=102400,
                   vocab=51200, max_seq_len=2048, tie_embeddings=True, dropout=0.1, attention="eager")

JOBS = [
    # (label, spec, gpu, nodes, seq_len, global_batch, target_s)
    ("GPT-3 175B on 1,024 A100-80GB", preset("gpt3-175b"), "a100-80g", 128, 2048, 1536, 2.0),
    ("GPT 1T on 3,072 A100-80GB", GPT_1T, "a100-80g", 384, 2048, 3072, 5.0),
    ("Mixtral-8x22B on 256 H100 (EP + folding)", preset("mixtral-8x22b"), "h100-sxm", 32, None, None, 5.0),
    ("DeepSeek-V3 on 2,048 H800", preset("deepseek-v3"), "h800", 256, None, None, 10.0),
]


def run(label, spec, gpu, nodes, seq, gb, target, repeat):
    seq = seq or default_seq_len(spec)
    t0 = time.perf_counter()
    cluster = default_cluster_for_gpu(gpu, nodes=nodes, gpus_per_node=8)
    templates, gpu_profile = build_templates(spec, seq, "bf16"), load_gpu_profile(cluster.gpu)
    build = time.perf_counter() - t0
    gb = gb or default_global_batch(cluster.world, seq)
    times, cpu = [], []
    for _ in range(repeat):
        cm = CostModel(spec, cluster, seq, templates, gpu_profile, "bf16")  # a fresh one: price from scratch
        c0 = time.process_time()
        res = search(cm, gb)
        cpu.append(time.process_time() - c0)
        times.append(res.stats.search_time_s)
    st = res.stats
    best = res.candidates[0] if res.candidates else None
    verdict = "ok" if min(cpu) <= target else "OVER TARGET"   # CPU time: what an idle 2-core machine sees
    print(f"{label}: seq {seq}, global batch {gb}")
    runs = f", runs {', '.join(f'{t:.2f}' for t in times)}" if repeat > 1 else ""
    print(f"  build {build:.2f} s | search {min(times):.2f} s wall, {min(cpu):.2f} s CPU "
          f"(target {target:.0f} s: {verdict}){runs}")
    print(f"  space {st.space} | memory-pruned {st.pruned_memory} | bounded {st.enumerated} | "
          f"time-pruned {st.pruned_time} | partitioned {st.priced} | layer pricings {st.layer_pricings}")
    if best:
        e = best.estimate
        print(f"  best: {best.strategy.short()} | step {e.step_time_s:.2f} s | MFU {100 * e.mfu:.1f}% | "
              f"peak {e.peak_bytes / 2**30:.1f} GiB")
    else:
        print("  nothing fits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="searches per job (the minimum is reported)")
    ap.add_argument("--only", default="", help="run the jobs whose label contains this text")
    args = ap.parse_args()
    for job in JOBS:
        if args.only in job[0]:
            run(*job, repeat=args.repeat)


if __name__ == "__main__":
    main()
