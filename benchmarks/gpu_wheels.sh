#!/usr/bin/env bash
# Wheels the GPU check needs on a machine without a network whose image lacks them (the lent
# H100/H200 image has torch, typer, rich, pyyaml, networkx, scipy, matplotlib, numpy; not
# pydantic or pulp). Run here, before the device call:
#   bash benchmarks/gpu_wheels.sh .whl    # then carry .whl and pass --wheels .whl
set -euo pipefail
DEST="${1:-.whl}"
PYVER="${PYVER:-3.12}"
mkdir -p "$DEST"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLAT[@]}" -d "$DEST" pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  pulp==4.2.0
ls "$DEST"
