"""benchmarks/calibrate_stack.py: one stack's constants refitted with everything else held at the shipped
values; ``--write`` replaces only that stack's line of each profile of its GPU type."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PROFILE = """name: x
# per software stack (--runtime): constants fitted over the published runs of this GPU type (docs)
gpu_constants: {matmul_scale: 0.9, sources: {all: "hardware level"}}
stacks:
  llm-foundry: {matmul_scale: 0.9, attention_scale: 1.1, sources: {all: "old"}}
  megatron: {attention_scale: 0.3, sources: {all: "I12a's"}}
"""


def test_write_replaces_only_the_stack_line(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import calibrate_modern as cal
    import calibrate_stack

    from autopar.core.gpu import StackConstants

    for name in ("p1", "p2"):
        (tmp_path / f"{name}.yaml").write_text(PROFILE)
    monkeypatch.setattr(calibrate_stack, "PROFILE_DIR", tmp_path)
    monkeypatch.setattr(cal, "PROFILES", {"ampere": ("p1", "p2"), "hopper": ("p3",)})
    fitted = cal.Fitted({"ampere": StackConstants(matmul_scale=0.9)},
                        {("ampere", "llm-foundry"): StackConstants(matmul_scale=0.85, attention_scale=1.1),
                         ("ampere", "megatron"): StackConstants(attention_scale=0.7)})
    written = calibrate_stack.write_stack(fitted, "llm-foundry", "python benchmarks/calibrate_stack.py --write")
    assert written == [tmp_path / "p1.yaml", tmp_path / "p2.yaml"]
    for path in written:
        lines = path.read_text().split("\n")
        assert lines[4].startswith("  llm-foundry: {matmul_scale: 0.85, attention_scale: 1.1, sources:")
        assert "calibrate_stack.py --write" in lines[4]
        assert lines[:4] + lines[5:] == PROFILE.split("\n")[:4] + PROFILE.split("\n")[5:]  # megatron's line kept
