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
import re

import torch
from torch import nn

from autopar.errors import InputError

WEIGHTS_ENV = "AUTOPAR_HF_WEIGHTS"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def hf_config(spec):
    """The transformers config object of ``spec.hf_config`` (nested sub-configs included)."""
    return config_from_dict(spec.hf_config or {})


def config_from_dict(raw: dict):
    import transformers

    raw = dict(raw)
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
    transformers keeps them, e.g. ``hf.model.layers``: the block list codegen shards).

    A pipeline stage (``codegen.runtime_hf.split_hf_stages``) keeps some of the decoder layers,
    under their global names, and runs ``stage_forward``: the decoder loop of the module's own
    ``forward`` (embedding, rotary tables, mask, layers, norm, head) over the parts it holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        self.staged = False     # set by the pipeline split
        self.seq_shards = 1     # tp under sequence parallel: hidden states hold seq/tp positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.staged:
            return stage_forward(self, x)
        if x.is_meta:  # shape checks on the meta device cannot read position ids
            with no_packing_probe():
                return self.hf(input_ids=x, use_cache=False).logits
        return self.hf(input_ids=x, use_cache=False).logits


# ----- pipeline stages ------------------------------------------------------------------
# model_types whose CausalLM forward is the plain decoder loop ``stage_forward`` reproduces
# (embedding unscaled, rotary tables and causal/sliding masks from the config, layers, norm,
# lm_head, no logit scaling); tests/test_hf_emit.py checks one stage == the module's forward.
PLAIN_DECODERS = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3")


def pp_problem(cfg) -> str | None:
    """Why a pipeline split cannot run this transformers config (None: it can)."""
    mtype = getattr(cfg, "model_type", None)
    if mtype not in PLAIN_DECODERS:
        return (f"a pipeline split of transformers model_type={mtype!r} is not emitted (stages re-run the decoder "
                f"loop of {', '.join(PLAIN_DECODERS)} only)")
    return None


def decoder(lm: nn.Module) -> nn.Module:
    """The decoder (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) inside an HF causal LM."""
    return getattr(lm, lm.base_model_prefix, None)


def _masks(cfg, embeds: torch.Tensor, pos: torch.Tensor) -> dict:
    """The causal and sliding-window masks the module's own forward builds (None where SDPA's
    ``is_causal`` does it)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kw = dict(config=cfg, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=pos)
    out = {"full_attention": create_causal_mask(**kw)}
    if getattr(cfg, "sliding_window", None):
        out["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    return out


def stage_forward(lm: HFLanguageModel, x: torch.Tensor) -> torch.Tensor:
    """tokens (first stage) or hidden states -> hidden states, or logits on the last stage."""
    hf = lm.hf
    dec, cfg = decoder(hf), hf.config
    h = dec.embed_tokens(x) if dec.embed_tokens is not None else x
    seq = x.shape[1] if dec.embed_tokens is not None else x.shape[1] * lm.seq_shards
    pos = torch.arange(seq, device=h.device).unsqueeze(0)
    full = h.new_empty(h.shape[0], seq, 1)  # the masks read the full sequence's shape, dtype and device
    masks = _masks(cfg, full, pos)
    # mistral-style configs slide on every layer; layer_types configs name each layer's kind
    default = "sliding_attention" if "sliding_attention" in masks and not getattr(cfg, "layer_types", None) \
        else "full_attention"
    emb = dec.rotary_emb(full, pos)
    for layer in dec.layers.values():
        kind = getattr(layer, "attention_type", default)
        h = layer(h, attention_mask=masks.get(kind), position_embeddings=emb, position_ids=pos, use_cache=False)
    if dec.norm is not None:
        h = dec.norm(h)
    return hf.lm_head(h) if hf.lm_head is not None else h


# ----- tensor parallel plan -------------------------------------------------------------
TP_STYLES = ("colwise", "rowwise")


def is_experts(m: nn.Module) -> bool:
    """Routed experts stacked in 3-D weights (transformers' ``*Experts``): replicated under tp."""
    return any(p.dim() == 3 for p in m.parameters(recurse=False))


def tp_plan(lm: nn.Module) -> tuple[dict[str, str], str | None]:
    """``({module path in lm: 'colwise' | 'rowwise'}, None)``, or ``({}, why not)``.

    From the config's ``base_model_tp_plan`` (``layers.*.self_attn.q_proj: colwise``, ...), else
    derived from the linears' roles (``derive_tp_plan``). Entries on routed experts are skipped:
    the experts stay replicated and every tp rank routes the same tokens, as in the catalog's
    plan; any other style (packed, gathered, replicated-with-allreduce) is refused."""
    dec = decoder(lm)
    head = getattr(lm, "lm_head", False)  # None: a pipeline stage without the head
    if dec is None or not isinstance(getattr(dec, "layers", None), (nn.ModuleList, nn.ModuleDict)) or \
            not (head is None or isinstance(head, nn.Linear)):
        return {}, f"{type(lm).__name__} is not a decoder with 'layers' and an 'lm_head' linear"
    patterns = dict(getattr(lm.config, "base_model_tp_plan", None) or {}) or derive_tp_plan(lm)
    if not patterns:
        return {}, f"{type(lm).__name__} has no base_model_tp_plan and its linears do not pair as column/row"
    experts = [n for n, m in dec.named_modules() if is_experts(m)]
    prefix = lm.base_model_prefix + "."
    out: dict[str, str] = {}
    for pattern, style in patterns.items():
        rx = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        for name, mod in dec.named_modules():
            if not rx.match(name) or any(name == e or name.startswith(e + ".") for e in experts):
                continue
            if style not in TP_STYLES or not isinstance(mod, nn.Linear):
                return {}, f"tensor-parallel style {style!r} on {name} ({type(mod).__name__}) is not emitted"
            out[prefix + name] = style
    return out, _unplanned(dec, {k[len(prefix):] for k in out})


def _unplanned(dec: nn.Module, planned: set[str]) -> str | None:
    """A linear left replicated beside sharded ones in a sub-module without experts (an MLA
    latent projection, say) would get partial gradients: refused. Sub-modules with routed
    experts run replicated (their own linears may be planned, e.g. shared experts)."""
    for name, sub in dec.named_modules():
        if name.count(".") != 2 or not name.startswith("layers.") or any(is_experts(m) for m in sub.modules()):
            continue
        lins = [f"{name}.{k}" for k, m in sub.named_modules() if isinstance(m, nn.Linear)]
        missing = [k for k in lins if k not in planned]
        if missing and len(missing) < len(lins):
            return f"{missing[0]} is outside the tensor-parallel plan beside sharded linears of {name}"
    return None


def derive_tp_plan(lm: nn.Module) -> dict[str, str]:
    """Megatron pairs read off the dataflow of one decoder layer (run where its weights are): in each
    sub-module holding linears (attention, MLP), the linears fed by the sub-module's own input are
    column-parallel and the one linear back to the model width is row-parallel. ``{}`` when a
    sub-module does not pair that way (or the layer cannot run alone)."""
    dec = decoder(lm)
    layer = next(iter(dec.layers.values() if isinstance(dec.layers, nn.ModuleDict) else dec.layers))
    hidden = lm.config.hidden_size
    subs = {n: m for n, m in layer.named_children() if any(isinstance(x, nn.Linear) for x in m.modules())}
    inputs: dict[str, int] = {}
    fed: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(_record(inputs, n), with_kwargs=True) for n, m in subs.items()]
    hooks += [m.register_forward_pre_hook(_record(fed, f"{n}.{k}"), with_kwargs=True)
              for n, s in subs.items() for k, m in s.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.device(next(layer.parameters()).device), torch.no_grad():
            h = torch.zeros(1, 8, hidden)
            pos = torch.arange(8).unsqueeze(0)
            layer(h, attention_mask=None, position_embeddings=dec.rotary_emb(h, pos), position_ids=pos)
    except Exception:
        return {}
    finally:
        for hk in hooks:
            hk.remove()
    plan = {}
    for n, s in subs.items():
        lins = {f"{n}.{k}": m for k, m in s.named_modules() if isinstance(m, nn.Linear)}
        col = [k for k in lins if fed.get(k) == inputs.get(n)]
        row = [k for k in lins if k not in col and lins[k].out_features == hidden]
        if not col or len(row) != 1 or len(col) + 1 != len(lins):
            return {}
        plan.update({f"layers.*.{k}": "colwise" for k in col} | {f"layers.*.{row[0]}": "rowwise"})
    return plan


def _record(store: dict, name: str):
    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        store[name] = id(x)
    return hook


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


def parallel_support(raw: dict) -> tuple[list[str], dict[str, str]]:
    """(["tp", "pp"] or fewer, {knob: why not}) for the transformers module of config ``raw``:
    what ``codegen.runtime_hf`` can apply. Decided on a one-layer copy built on the meta device
    (the plan's patterns and the decoder layout do not depend on the depth)."""
    small = dict(raw, num_hidden_layers=1)
    if isinstance(raw.get("layer_types"), list):
        small["layer_types"] = raw["layer_types"][:1]
    try:
        lm = _build(config_from_dict(small))
    except Exception as exc:
        why = f"{type(exc).__name__} building a one-layer copy: {_first_line(exc)}"
        return [], {"tp": why, "pp": why}
    out, why = [], {}
    plan, problem = tp_plan(lm)
    if plan and not problem:
        out.append("tp")
    else:
        why["tp"] = problem or "no tensor-parallel plan"
    problem = pp_problem(lm.config)
    if problem is None and getattr(lm.config, "tie_word_embeddings", False):
        problem = "tied input and output embeddings across pipeline stages are not emitted for transformers modules"
    if problem:
        why["pp"] = problem
    else:
        out.append("pp")
    return out, why


def _build(cfg) -> nn.Module:
    with torch.device("meta"):
        try:
            return model_class(cfg)._from_config(cfg, attn_implementation="sdpa")
        except (ValueError, ImportError):
            return model_class(cfg)._from_config(cfg, attn_implementation="eager")
