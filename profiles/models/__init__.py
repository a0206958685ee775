"""Built-in architectures written as ``nn.Module`` code (GPT, Llama, MoE, MLA), and
``build_model`` which also calls user factories."""

from __future__ import annotations

import importlib
from contextlib import nullcontext

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from autopar.core.model_spec import ModelSpec
from autopar.errors import InputError
from autopar.profiles.models.transformer import Block, Transformer

__all__ = ["Block", "Transformer", "build_model", "load_factory"]


def build_model(spec: ModelSpec, device: str | torch.device = "meta", layer_ids: list[int] | None = None,
                init: bool = True) -> nn.Module:
    """Build the module for ``spec`` on ``device`` (``meta``: shapes only, no memory).

    ``layer_ids``: only these blocks of a built-in model (``Transformer``); ``init=False`` skips
    the ``torch.nn.init`` initialisers (``SkipInit``): what graph capture on meta wants."""
    if getattr(spec, "hf_config", None) is not None:  # a transformers module, as itself
        from autopar.profiles.models.hf import build_hf_lm

        return build_hf_lm(spec, device)
    with torch.device(device), (nullcontext() if init else SkipInit()):
        if spec.family == "custom":
            return _call_factory(spec.factory)
        return Transformer(spec, layer_ids)


class SkipInit(TorchFunctionMode):
    """Construction without the ``torch.nn.init`` initialisers: each returns its tensor untouched.

    For the meta device, where there are no values to fill anyway: there the initialisers' meta
    kernels (``normal_``, ``uniform_``) are Python references whose first call imports
    ``torch._dynamo`` (seconds of a cold ``autopar plan``). Shapes, dtypes and parameter identity
    (tied weights) are those of a normal construction."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def load_factory(path: str):
    """Import ``pkg.mod:fn`` and return ``fn``; one-line InputError when it cannot."""
    if ":" not in path:
        raise InputError(f"model: '{path}' is not a preset, a config.json path or a factory 'pkg.mod:fn'")
    mod_name, fn_name = path.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # any import failure of user code is an input problem
        raise InputError(f"model: cannot import module '{mod_name}' for factory '{path}': "
                         f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InputError(f"model: module '{mod_name}' has no callable '{fn_name}' (factory '{path}')")
    return fn


def _call_factory(path: str) -> nn.Module:
    fn = load_factory(path)
    try:
        module = fn()
    except Exception as exc:
        raise InputError(f"model: factory '{path}' raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise InputError(f"model: factory '{path}' returned {type(module).__name__}, not an nn.Module")
    return module
