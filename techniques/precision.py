"""Which stacks ``plan`` searches in fp8 (``--dtype fp8``: fp8 GEMMs, bf16 elsewhere): one declaration per
``core.gpu.Runtime``, each with the stack's switch. ``estimate`` prices fp8 under every stack (what a run in
fp8 would take); ``plan`` refuses to search fp8 for a stack whose program does not run it."""

from __future__ import annotations

# stack -> how it runs fp8 GEMMs, or "" where it does not (the reason in the comment):
# - torch: autopar's emitted program runs bf16 autocast (``codegen``): no fp8 program to search yet.
# - deepspeed: DeepSpeed has no fp8 training switch of its own (its rows state none): left out.
FP8: dict[str, str] = {
    "torch": "",
    "torchtitan": "torchao float8 (model.converters = [\"float8\"])",
    "megatron": "Transformer Engine (--fp8-format hybrid)",
    "deepspeed": "",
    "llm-foundry": "Composer precision: amp_fp8 (Transformer Engine, fc_type: te)",
}


def fp8_refusal(stack: str) -> str | None:
    """The one-line refusal of ``plan --dtype fp8 --runtime stack`` (None where the stack runs fp8)."""
    if FP8[stack]:
        return None
    runs = ", ".join(f"--runtime {s}" for s, how in FP8.items() if how)
    why = "autopar's emitted programs run bf16 autocast, not fp8 GEMMs" if stack == "torch" else \
        f"--runtime {stack} declares no fp8 training"
    return f"--dtype fp8: {why}; plan with --dtype bf16, or plan for fp8 with {runs}"
