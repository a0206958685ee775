"""A Hugging Face transformers module built from its config, for capture and for emitted programs.

``build_hf_model(spec)`` builds the module with ``from_config`` (no hub access, no weights): the
class in the config's ``architectures`` when transformers has it, else ``AutoModelForCausalLM``,
else ``AutoModel``. ``HFLanguageModel`` wraps a causal LM into the contract of emitted programs
(``forward(tokens[b, s]) -> logits[b, s, vocab]``); with ``AUTOPAR_HF_WEIGHTS=DIR`` set at run
time, the CPU build that initialises every rank's shards loads the weights of that local folder
(``from_pretrained``, no hub) instead of the seeded initialisation. This file travels into run
directories (``codegen/emit_vendor``): torch and transformers only.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from autopar.errors import InputError

WEIGHTS_ENV = "AUTOPAR_HF_WEIGHTS"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def hf_config(spec):
    """The transformers config object of ``spec.hf_config`` (nested sub-configs included)."""
    import transformers

    raw = dict(spec.hf_config or {})
    mtype = raw.pop("model_type", None)
    for key in ("transformers_version", "_name_or_path", "auto_map"):
        raw.pop(key, None)
    try:
        cfg = transformers.AutoConfig.for_model(mtype, **raw)
    except Exception as exc:
        raise InputError(f"model: transformers cannot read model_type={mtype!r}: {type(exc).__name__}: "
                         f"{_first_line(exc)}; check the config.json or upgrade transformers") from None
    return cfg


def model_class(cfg) -> type:
    """The class named by ``architectures`` when transformers has it, else the Auto class for
    causal LMs, else the bare ``AutoModel``."""
    import transformers

    for arch in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(cfg) in auto._model_mapping:
            return auto._model_mapping[type(cfg)]
    raise InputError(f"model: transformers has no model class for model_type={cfg.model_type!r}; "
                     "name one in the config's architectures")


def build_hf_model(spec, device: str | torch.device = "meta", attn: str | None = None,
                   experts: str | None = None) -> nn.Module:
    """The transformers module of ``spec`` on ``device``, with SDPA attention unless the spec (or
    ``attn``) asks for eager or the model does not support SDPA; ``experts`` picks transformers'
    MoE expert kernel (``eager``: the per-expert loop, any dtype and device)."""
    cfg = hf_config(spec)
    if experts:
        cfg._experts_implementation = experts
    cls = model_class(cfg)
    impl = attn or ("eager" if spec.attention == "eager" else "sdpa")
    with torch.device(device):
        try:
            return cls._from_config(cfg, attn_implementation=impl)
        except (ValueError, ImportError):
            if impl == "eager":
                raise
            return cls._from_config(cfg, attn_implementation="eager")
        except Exception as exc:
            raise InputError(f"model: cannot build {cls.__name__} from config: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None


@contextlib.contextmanager
def no_packing_probe():
    """Answer transformers' value-reading packed-sequence probe (``.all()`` on position ids) as a
    training batch without packing does: needed on meta tensors and while tracing."""
    patched = []
    try:
        import transformers.masking_utils as mu

        if hasattr(mu, "find_packed_sequence_indices"):
            patched.append((mu, "find_packed_sequence_indices", mu.find_packed_sequence_indices))
            mu.find_packed_sequence_indices = lambda position_ids: None
    except ImportError:
        pass
    try:
        yield
    finally:
        for mod, name, orig in patched:
            setattr(mod, name, orig)


class HFLanguageModel(nn.Module):
    """A transformers causal LM as ``forward(tokens) -> logits`` (its decoder blocks stay where
    transformers keeps them, e.g. ``hf.model.layers``: the block list codegen shards)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.is_meta:  # shape checks on the meta device cannot read position ids
            with no_packing_probe():
                return self.hf(input_ids=tokens, use_cache=False).logits
        return self.hf(input_ids=tokens, use_cache=False).logits


def build_hf_lm(spec, device: str | torch.device = "meta") -> nn.Module:
    """The emitted programs' model: ``HFLanguageModel`` around the module of ``spec.hf_config``
    (fp32, eager-or-SDPA as planned); a CPU build loads ``$AUTOPAR_HF_WEIGHTS`` when set."""
    weights = os.environ.get(WEIGHTS_ENV)
    if weights and str(device) == "cpu":
        cls = model_class(hf_config(spec))
        try:
            model = cls.from_pretrained(weights, dtype=torch.float32, local_files_only=True,
                                        experts_implementation="eager")
        except Exception as exc:
            raise InputError(f"{WEIGHTS_ENV}={weights}: cannot load {cls.__name__} weights: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None
    else:
        # the per-expert loop: runs in fp32 and on the meta device (grouped_mm wants bf16 on CUDA)
        model = build_hf_model(spec, device, experts="eager")
    return HFLanguageModel(model)
