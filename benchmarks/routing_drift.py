"""How far routing moves from the initial weights while a MoE model trains, in one process.

    python benchmarks/routing_drift.py moe-tiny --steps 8 --ep 4

Trains the model as an emitted ``train.py`` does by default (its sample data and sampler, seed 0,
AdamW betas (0.9, 0.95), weight decay 0.1 on matrices, ``--lr`` with the program's schedule for
``--steps``: no warm-up under 20 steps, cosine to 0.1x; gradient clipping 1.0) and prints, per
step, the busiest expert-parallel rank's routed copies over the mean (contiguous expert blocks,
the layout a trace is priced on) in each MoE layer.
``autopar trace-routing --data sample`` records step 1's routing; later steps show what a trace of
initial weights cannot know.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from autopar.codegen.runtime_data import TokenSampler
from autopar.codegen.runtime_optim import lr_lambda
from autopar.codegen.sample_data import sample_bytes, sample_size
from autopar.profiles.intake import resolve_model
from autopar.profiles.models import build_model
from autopar.profiles.routing import find_routers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="moe-tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="emit's default for models under 10.7M parameters")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = resolve_model(args.model)
    model = build_model(spec, "cpu")
    model.init_weights(0)
    raw, _ = sample_bytes(spec.vocab, sample_size(args.seq_len))
    sampler = TokenSampler([torch.frombuffer(bytearray(raw), dtype=torch.uint16)], args.seq_len,
                           args.global_batch, 0)
    routers = [m for _, m in find_routers(model)]
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in routers}
    for m in routers:
        m.register_forward_hook(lambda mod, _i, out: seen[id(mod)].append(
            torch.bincount(out[0].reshape(-1), minlength=spec.num_experts)))
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    for step in range(1, args.steps + 1):
        for counts in seen.values():
            counts.clear()
        batch = sampler.next_batch()
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_lambda(step - 1, 0, args.steps, "cosine", 0.1)  # the program's schedule
        opt.step()
        opt.zero_grad(set_to_none=True)
        load = np.stack([sum(seen[id(m)]).numpy() for m in routers])
        ranks = load.reshape(len(routers), args.ep, -1).sum(axis=2)
        ratio = ranks.max(axis=1) / ranks.mean(axis=1)
        print(f"step {step} loss {loss.item():.3f} busiest ep{args.ep} rank / mean per MoE layer: "
              + " ".join(f"{r:.2f}" for r in ratio))


if __name__ == "__main__":
    main()
