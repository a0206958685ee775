#!/usr/bin/env bash
# GPU truth in one command: profile, closed-loop validate and one emitted program on this device.
#
#   benchmarks/gpu_check.sh [--out DIR] [--wheels DIR] [--dry-run] [--quick] [--budget-s S] [--steps N]
#                           [--deadline-s S] [--ckpt-max-gb GB]
#
# On a machine with one CUDA GPU and a fresh checkout; about 8 minutes (--quick: about 3,
# ending by --deadline-s, default 170 s). Writes env.json, profile-<gpu>-measured.json,
# summary.json, summary.md and log.txt into --out, the summaries after every step (see
# benchmarks/gpu_check.py). --dry-run runs the same steps on CPU with tiny sizes (CI runs
# it through tests/test_gpu_check.py).
#
# Python: $PYTHON if set; else the repository's .venv for --dry-run; else python3. Where that
# python has no CUDA build of torch, a venv .venv-gpu gets the pinned $TORCH_SPEC
# (default torch==2.13.0; the registry's Linux x86-64 wheel is the CUDA build).
# autopar itself is not installed: the repository root is the package, linked into a
# temporary site folder. Missing dependencies come from --wheels DIR (a machine without a
# network: fill DIR with benchmarks/gpu_wheels.sh on a machine with one) or the registry.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; ARGS+=("$1") ;;
    --wheels) WHEELS="$2"; shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ "$DRY" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3; fi

if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[gpu_check.sh] $PY has no CUDA torch: installing ${TORCH_SPEC:-torch==2.13.0} into $REPO/.venv-gpu"
  python3 -m venv "$REPO/.venv-gpu"
  PY="$REPO/.venv-gpu/bin/python"
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi

SITE="$(mktemp -d)"
trap 'rm -rf "$SITE"' EXIT
ln -s "$REPO" "$SITE/autopar"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

missing="$("$PY" - <<'PYEOF'
import importlib.util
need = {"pydantic": "pydantic", "typer": "typer", "rich": "rich", "yaml": "pyyaml", "networkx": "networkx",
        "scipy": "scipy", "pulp": "pulp", "matplotlib": "matplotlib", "numpy": "numpy"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)"
if [ -n "$missing" ]; then
  echo "[gpu_check.sh] missing: $missing"
  if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  else
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --target "$SITE" $missing
  fi
fi
"$PY" -m autopar --help >/dev/null
export PYTHONUNBUFFERED=1
exec "$PY" "$REPO/benchmarks/gpu_check.py" "${ARGS[@]}"
