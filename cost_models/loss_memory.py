"""The loss's vocabulary-sized memory on one rank (per micro-batch): the transient logits and the loss's
backward (``logits_bytes``, ``loss_backward_bytes``) and its saved tensors beyond what ``saved_bytes`` shards
(``gathered_loss_bytes``). ``ctx``: a ``layer_cost.PricingContext`` (not imported: layer_cost imports this module),
of which these read the runtime, the stack, ``compile`` and ``loss_parallel``. Read by ``layer_cost.price_layer``."""

from __future__ import annotations

from autopar.core.gpu import FUSED_LOSS_STACKS
from autopar.core.strategy import Strategy
from autopar.cost_models.layer_model import LayerTemplate, Shards


def fused_loss(ctx) -> bool:
    """Whether the loss runs as one kernel on the 16-bit logits: it saves them and a per-token logsumexp (no fp32
    log-probabilities) and its backward writes one 16-bit logit gradient. A compiled loss (``compile``
    model+loss), and llm-foundry's MPT: ``ComposerMPTCausalLM`` defaults ``loss_fn`` to ``fused_crossentropy``,
    flash-attn's ``losses.cross_entropy.CrossEntropyLoss`` (llm-foundry 0.3.0 ``models/mpt/modeling_mpt.py``
    lines 721-727; the MPT forward leaves the logits 16-bit under autocast), whose xentropy kernel takes the bf16
    logits, saves ``(logits, lse, labels)`` and returns a gradient of the logits' dtype, not in place
    (``inplace_backward`` False by default)."""
    return ctx.compile == "model+loss" or ctx.stack_name in FUSED_LOSS_STACKS


def logits_bytes(layer: LayerTemplate, s: Strategy, sh: Shards, ctx) -> float:
    """Transient logits at the loss, full vocabulary on every tp rank (see ``layer_cost._vocab_comm``); under
    tp the all-gather's output and its concatenation along the vocabulary (DTensor Shard(-1) ->
    Replicate) are both live when the loss starts."""
    if ctx.runtime == "megatron" and layer.kind == "output":
        return layer.temp_bytes * sh.tokens / s.tp  # vocab-parallel logits stay split
    if layer.kind != "output":
        return layer.temp_bytes * sh.tokens
    split = _vocab_split(s, ctx)
    if fused_loss(ctx):  # one fused kernel writes the 16-bit logit gradient directly
        return _vocab_saved(layer, sh) / 2 / split
    forward = layer.temp_bytes * sh.tokens * (2 if s.tp > split else 1) / split
    return max(forward, loss_backward_bytes(layer, sh, split > 1) / split)


def loss_backward_bytes(layer: LayerTemplate, sh: Shards, vocab_parallel: bool = False) -> float:
    """The loss's backward beyond its saved log-probabilities: ``nll_loss_backward`` writes a
    full fp32 [tokens, vocab] gradient and ``log_softmax_backward`` another while the saved
    output is still held (torch autograd frees a node's saved tensors only after it runs), so
    the loss phase peaks at three fp32 logit-sized tensors, above the forward's bf16 logits +
    fp32 upcast + log-probabilities. Full vocabulary on every tp rank (see ``layer_cost._vocab_comm``).
    DTensor's ``loss_parallel`` (torch/distributed/tensor/parallel/loss.py,
    ``_nll_loss_and_log_softmax_backward``) builds ``(zeros_like(x) + exp(x)) * grad`` beside the
    saved ``x``: three fp32 temporaries, four with the saved one."""
    if layer.kind != "output":
        return 0.0
    return (3 if vocab_parallel else 2) * _vocab_saved(layer, sh)


def _vocab_saved(layer: LayerTemplate, sh: Shards) -> float:
    """The loss's vocabulary-sized saved tensors (fp32 log-probabilities), full vocabulary."""
    return sum(t.bytes for t in layer.saved if t.shard in ("tp", "vocab") and not t.const) * sh.tokens


def _vocab_split(s: Strategy, ctx) -> int:
    """Over how many ranks the loss's logits are split: tp for a vocab-parallel loss, else 1."""
    return s.tp if ctx.runtime == "megatron" or ctx.loss_parallel else 1


def gathered_loss_bytes(layer: LayerTemplate, s: Strategy, sh: Shards, ctx) -> float:
    """The cross-entropy runs on the gathered logits on every tp rank: its vocabulary-sized saved
    tensors are not split by tp (the (tp-1)/tp that ``saved_bytes`` divided away) unless the loss
    is vocab-parallel. A fused loss (``fused_loss``) keeps the 16-bit logits (and a per-token logsumexp)
    instead of fp32 log-probabilities: half the bytes."""
    if layer.kind != "output":
        return 0.0
    full = _vocab_saved(layer, sh)
    mine = full / _vocab_split(s, ctx) / (2 if fused_loss(ctx) else 1)
    return mine - full / s.tp  # saved_bytes counted full / tp
