"""Router exporters: router name -> the plain linear gate a standard architecture runs.

A Hugging Face MoE architecture routes with one linear gate ``W x`` [E, H] and a fixed
rule (softmax over the top-k logits, top-k of softmax, or sigmoid with a selection
bias). Each megasmoe router registers here a function that turns its checkpoint
tensors (``router.<name>`` of one layer) into that gate, or refuses:

    @register_exporter("my_router")
    def _my_router(ctx: RouterContext) -> GateExport: ...

A router without an exporter is refused with "router X cannot be exported to a standard
architecture; ...". An exporter must account for every tensor of its router: each one
is used (``used``), or named with the reason it has no role at inference (``ignored``,
e.g. a training schedule position); anything else is an error unless the export allows
dropping tensors. A logit bias (``bias``) constant over the experts is dropped (softmax
is shift-invariant); any other needs an architecture with a router logit bias (GPT-OSS,
or megasmoe's own with ``--remote-code``), else it is refused, or dropped with
``allow_drop`` (listed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megasmoe.convert.errors import ConversionError

__all__ = ["Routing", "GateExport", "RouterContext", "register_exporter", "exporters",
           "export_gate", "refuse_logit_bias", "router_options"]


@dataclass(frozen=True)
class Routing:
    """The routing rule a gate is used with (the same for every MoE layer).

    ``score_function``: softmax or sigmoid. ``normalize``: the k selected probabilities
    are renormalised to sum to 1 (softmax over the top-k logits = megatron
    pre_softmax=false; for sigmoid megatron renormalises whenever k > 1).
    ``scaling``: factor on the selected probabilities (None = 1). ``selection_bias``:
    a per-expert bias added to the scores for the choice only (DeepSeek-V3 style).
    """

    score_function: str
    normalize: bool
    topk: int
    scaling: Optional[float] = None
    selection_bias: bool = False


@dataclass
class GateExport:
    """One layer's exported gate."""

    weight: torch.Tensor
    """[E, H] gate weight."""
    routing: Routing
    bias: Optional[torch.Tensor] = None
    """[E] added to the logits before the score function (None = none)."""
    selection_bias: Optional[torch.Tensor] = None
    """[E] added to the scores for the choice only (needs Routing.selection_bias)."""
    used: set = field(default_factory=set)
    """Router tensor names (``router.<name>``) this gate was computed from."""
    ignored: dict = field(default_factory=dict)
    """Router tensor name -> why it has no role at inference."""


@dataclass
class RouterContext:
    """What an exporter sees: one MoE layer's router tensors and the run's config."""

    name: str
    layer: int
    tensors: dict
    """``{name: tensor}`` of this layer's router (megatron names, e.g. ``weight``)."""
    options: dict
    """The router's fields (its config dataclass defaults, overridden by moe.router.*)."""
    config: dict
    """The whole megasmoe config (nested dicts)."""

    @property
    def topk(self) -> int:
        """moe.topk."""
        return self.config["moe"]["topk"]

    def tensor(self, name: str) -> torch.Tensor:
        """A router tensor; ConversionError naming it if the checkpoint lacks it."""
        if name not in self.tensors:
            raise ConversionError(f"router {self.name}: layer {self.layer} has no "
                                  f"mlp.router.{name} in the checkpoint")
        return self.tensors[name]

    def routing_dtype(self) -> torch.dtype:
        """The dtype megasmoe routes in (moe.router_dtype)."""
        return torch.float64 if self.config["moe"].get("router_dtype") == "fp64" else torch.float32


_EXPORTERS: dict[str, Callable[[RouterContext], GateExport]] = {}


def register_exporter(name: str) -> Callable:
    """Decorator: register the exporter of router ``name``."""

    def wrap(fn: Callable[[RouterContext], GateExport]) -> Callable:
        if name in _EXPORTERS:
            raise ValueError(f"router exporter '{name}' is registered twice")
        _EXPORTERS[name] = fn
        return fn

    return wrap


def exporters() -> list[str]:
    """Router names that have an exporter."""
    return sorted(_EXPORTERS)


def router_options(config: dict) -> dict:
    """moe.router.* of a config, over the router config dataclass's defaults."""
    from megasmoe.routers import router_config_class

    router = dict(config["moe"].get("router", {}))
    name = router.pop("name", "topk")
    router.update(router.pop("options", {}))
    try:
        config_cls = router_config_class(name)
        defaults = dataclasses.asdict(config_cls())
    except Exception:  # noqa: BLE001 - an unknown router is refused by export_gate
        defaults = {}
    return {**defaults, **router}


def _refuse(name: str, why: str) -> ConversionError:
    return ConversionError(f"router {name} cannot be exported to a standard architecture; {why}")


def export_gate(ctx: RouterContext, allow_drop: bool = False,
                dropped: list | None = None) -> GateExport:
    """Run the router's exporter on one layer and settle its logit bias.

    A bias constant over the experts is dropped (exact for softmax scores); any other
    bias stays on the gate, for an architecture that holds one (GPT-OSS, megasmoe's own;
    export.py refuses or drops it otherwise). Tensors the exporter neither used nor
    ignored are refused unless ``allow_drop`` (then they are listed in ``dropped``).
    """
    fn = _EXPORTERS.get(ctx.name)
    if fn is None:
        raise _refuse(ctx.name, "no exporter is registered for it (megasmoe/convert/routers.py)")
    gate = fn(ctx)
    leftover = set(ctx.tensors) - gate.used - set(gate.ignored)
    if leftover:
        what = ", ".join(f"mlp.router.{n}" for n in sorted(leftover))
        if not allow_drop:
            raise ConversionError(f"router {ctx.name}: layer {ctx.layer}: {what} would not be "
                                  f"written; pass --allow-drop to export without it")
        if dropped is not None:
            dropped.append(f"layer {ctx.layer}: {what}")
    if gate.bias is not None and gate.routing.score_function == "softmax":
        b = gate.bias.double()
        if bool((b.max() - b.min()).abs() == 0):
            gate.bias = None  # softmax(l + c) = softmax(l): the same choice and weights
    return gate


def refuse_logit_bias(name: str, layer: int, bias: torch.Tensor, why_not: str,
                      why_not_remote: Optional[str] = None) -> ConversionError:
    """The error for a per-expert logit bias no architecture on offer can hold.

    ``why_not``: why GPT-OSS (the standard target with a router bias) cannot hold the
    rest of the model; ``why_not_remote``: why megasmoe's own cannot either (when
    ``--remote-code`` was given; None otherwise).
    """
    b = bias.double()
    if why_not_remote is None:
        way_out = ("pass --remote-code to export megasmoe's own architecture (loads with "
                   "trust_remote_code), or --allow-drop")
    else:
        way_out = f"nor can megasmoe's own ({why_not_remote}); pass --allow-drop"
    return _refuse(name, (
        f"layer {layer} adds a per-expert bias to the router logits (range "
        f"{b.min().item():.4g}..{b.max().item():.4g}); GPT-OSS, the standard target with a "
        f"router logit bias, cannot hold this model ({why_not}); {way_out} to export the "
        f"gate without it (the routing then differs)"))


# ----------------------------------------------------------------------------- exporters


def _topk_routing(ctx: RouterContext, score_function: str, pre_softmax: bool,
                  scaling: Optional[float], selection_bias: bool = False,
                  topk: Optional[int] = None) -> Routing:
    k = ctx.topk if topk is None else topk
    if score_function == "softmax":
        normalize = not pre_softmax
    elif score_function == "sigmoid":
        normalize = k > 1  # megatron renormalises sigmoid scores whenever k > 1
    else:
        raise _refuse(ctx.name, f"moe.router.score_function={score_function!r} is unknown")
    return Routing(score_function, normalize, k, scaling if scaling not in (None, 1.0) else None,
                   selection_bias)


@register_exporter("topk")
def _topk(ctx: RouterContext) -> GateExport:
    """megatron TopKRouter: W as is; softmax (pre_softmax or not) or sigmoid scores."""
    o = ctx.options
    routing = _topk_routing(ctx, o.get("score_function", "softmax"),
                            bool(o.get("pre_softmax", False)), o.get("topk_scaling_factor"))
    return GateExport(ctx.tensor("weight"), routing, used={"weight"})


@register_exporter("sigmoid_bias")
def _sigmoid_bias(ctx: RouterContext) -> GateExport:
    """DeepSeek-V3 routing: sigmoid scores, expert bias for the choice only."""
    routing = _topk_routing(ctx, "sigmoid", False, ctx.options.get("topk_scaling_factor"),
                            selection_bias=True)
    return GateExport(ctx.tensor("weight"), routing,
                      selection_bias=ctx.tensor("expert_bias").float(),
                      used={"weight", "expert_bias"})


@register_exporter("compete")
def _compete(ctx: RouterContext) -> GateExport:
    """CompeteSMoE: competition is a training-time schedule; inference is top-k of W x,
    softmax over the selected (megatron pre_softmax=false)."""
    return GateExport(ctx.tensor("weight"), _topk_routing(ctx, "softmax", False, None),
                      used={"weight"})


@register_exporter("simsmoe")
def _simsmoe(ctx: RouterContext) -> GateExport:
    """SimSMoE: the SMoE gate W; the CKA projection and the pair tracker train only."""
    return GateExport(ctx.tensor("weight"), _topk_routing(ctx, "softmax", False, None),
                      used={"weight"},
                      ignored={"projection": "CKA projection P of the training-time "
                                             "similarity loss",
                               "pair_tracking": "training-time expert-pair counter"})


@register_exporter("domain_steer")
def _domain_steer(ctx: RouterContext) -> GateExport:
    """W plus the fixed steering bias on the logits (a constant one folds away)."""
    routing = _topk_routing(ctx, "softmax", False, None)
    return GateExport(ctx.tensor("weight"), routing, bias=ctx.tensor("steering_bias"),
                      used={"weight", "steering_bias"})


@register_exporter("xmoe")
def _xmoe(ctx: RouterContext) -> GateExport:
    """g = (W_red x) . normalize(M)^T = x . (normalize(M) W_red)^T: one linear gate."""
    m = F.normalize(ctx.tensor("expert_embeddings").double(), p=2.0, dim=1, eps=1e-4)
    w = (m @ ctx.tensor("w_reduce").double()).to(ctx.tensor("w_reduce").dtype)
    return GateExport(w, _topk_routing(ctx, "softmax", False, None),
                      used={"w_reduce", "expert_embeddings"})


@register_exporter("stablemoe")
def _stablemoe(ctx: RouterContext) -> GateExport:
    """g = x . normalize(M)^T: the gate is the normalised expert embeddings."""
    emb = ctx.tensor("expert_embeddings")
    w = F.normalize(emb.double(), p=2.0, dim=1, eps=1e-4).to(emb.dtype)
    return GateExport(w, _topk_routing(ctx, "softmax", False, None), used={"expert_embeddings"})


@register_exporter("smoe_dropout")
def _smoe_dropout(ctx: RouterContext) -> GateExport:
    """The frozen gate with the inference k (moe.router.inference_k, default moe.topk)."""
    k = ctx.options.get("inference_k") or ctx.topk
    return GateExport(ctx.tensor("weight"), _topk_routing(ctx, "softmax", False, None, topk=k),
                      used={"weight"},
                      ignored={"schedule_step": "position of the training k schedule; "
                                                "inference uses moe.router.inference_k"})


@register_exporter("hyper")
def _hyper(ctx: RouterContext) -> GateExport:
    """The hypernetwork's generated gate (W_r, b), materialised in the routing dtype."""
    from megasmoe.routers import functional as RF

    dtype = ctx.routing_dtype()
    names = ("embedding", "hyper_w1", "hyper_b1", "hyper_w2", "hyper_b2")
    w, b = RF.hyper_gate(*(ctx.tensor(n).to(dtype) for n in names),
                         ctx.config["moe"]["num_experts"])
    out_dtype = ctx.tensor("embedding").dtype
    return GateExport(w.to(out_dtype).contiguous(), _topk_routing(ctx, "softmax", False, None),
                      bias=b.to(out_dtype), used=set(names))


@register_exporter("spectral")
def _spectral(ctx: RouterContext) -> GateExport:
    """Exact only at c = 0 (then it is the learned router, renormalised or not)."""
    c = float(ctx.options.get("c", 0.5))
    if c != 0.0:
        raise _refuse("spectral", (
            f"moe.router.c={c} mixes softmax(W x) with a softmax over the experts' singular "
            f"directions, and a standard gate is a single softmax; export the checkpoint "
            f"trained with topk (spectral is training-free) or set moe.router.c=0"))
    normalize = bool(ctx.options.get("normalize_topk", True))
    return GateExport(ctx.tensor("weight"), _topk_routing(ctx, "softmax", not normalize, None),
                      used={"weight"})


@register_exporter("unified")
def _unified(ctx: RouterContext) -> GateExport:
    """Refused: a cross-token top-k gives each token a variable number of experts."""
    raise _refuse("unified", (
        "its cross-token top-k gives each token a variable number of experts (chosen among "
        "the tokens of a group), and standard architectures route each token alone to "
        "exactly k experts; its W_r was trained under this cross-token selection, so a "
        "per-token top-k gate with the same weights would be a different model; to get an "
        "exportable checkpoint, train with topk"))


@register_exporter("stochastic")
def _stochastic(ctx: RouterContext) -> GateExport:
    """S2MoE's inference: no noise, one pass, W_r with moe.router.inference_k experts."""
    from megasmoe.routers.options import S2MoEConfig

    k = ctx.options.get("inference_k") or S2MoEConfig.default_inference_k(ctx.topk)
    unused = "S2MoE's mixing gate weighs the noise branch, which inference does not run"
    return GateExport(ctx.tensor("weight"), _topk_routing(ctx, "softmax", False, None, topk=k),
                      used={"weight"}, ignored={"mix_weight": unused, "mix_bias": unused})


@register_exporter("vq")
def _vq(ctx: RouterContext) -> GateExport:
    """Refused: VQMoE's second branch is not a gate."""
    raise _refuse("vq", (
        "VQMoE adds to every token the expert its nearest codebook entry picks, run on a "
        "LayerNorm'd copy of the token and mixed in by a learned two-way gate, which no "
        "standard architecture has and megasmoe's --remote-code architecture does not "
        "implement either; dropping that branch would change the model"))
