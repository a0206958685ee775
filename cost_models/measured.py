"""Reading a measured profile (``autopar profile`` / ``autopar profile-comm``) into the cost model's
timer and collective fits (cost_models: it builds an ``OpTimer`` and ``CommFit``s, so it sits above profiles/).

A measured profile is a ``GpuProfile`` file (JSON) with ``measured_ops`` and ``meta``; its
curves were fitted on the device, so ``--profile FILE`` prices with them (source "fit"), takes
an exact op-signature hit from ``measured_ops`` (source "measurement") and prices collectives
with its ``comm_fits`` (CommCost source "measurement").
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from autopar.core.gpu import GpuProfile
from autopar.cost_models.comm import CommFit
from autopar.cost_models.compute import OpTimer
from autopar.errors import InputError
from autopar.profiles.hw import load_gpu_profile


def load_measured_profile(path: str | Path, gpu: GpuProfile | None,
                          dtype: str) -> tuple[OpTimer, list[CommFit] | None]:
    """(OpTimer on the fitted profile with its measured op table, the collective fits or None).

    ``gpu`` is the cluster's profile: a measured profile of another device kind is refused
    (a CPU profile cannot price an H100 cluster)."""
    prof = load_gpu_profile(Path(path), field="--profile")
    if not prof.measured_ops and not prof.meta.get("measured"):
        raise InputError(f"--profile: {path} holds no measurements; write one with `autopar profile MODEL`")
    _check_kind(prof, gpu, path)
    if dtype not in prof.peak_tflops:
        raise InputError(f"--profile: {path} was measured in {', '.join(prof.peak_tflops)}, not {dtype}; "
                         f"pass --dtype {next(iter(prof.peak_tflops))} or profile with --dtype {dtype}")
    measured = {k: (v[0], v[1]) for k, v in prof.measured_ops.items()}
    return OpTimer(gpu=prof, dtype=dtype, measured=measured, source="fit"), comm_fits(prof, path)


def comm_fits(prof: GpuProfile, path: str | Path = "") -> list[CommFit] | None:
    """The profile's collective fits as ``CommFit``s (None when it has none)."""
    if not prof.comm_fits:
        return None
    try:
        return [CommFit.model_validate(f) for f in prof.comm_fits]
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"--profile: {path}: comm_fits: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _check_kind(prof: GpuProfile, gpu: GpuProfile | None, path: str | Path) -> None:
    if gpu is None:
        return
    measured_cpu, cluster_cpu = prof.cores is not None, gpu.cores is not None or gpu.name.startswith("cpu")
    if measured_cpu != cluster_cpu:
        raise InputError(f"--profile: {path} was measured on {prof.meta.get('device', prof.name)} but the cluster "
                         f"uses '{gpu.name}'; pass --gpu {path if measured_cpu else 'NAME'} or a profile "
                         "measured on that device")
