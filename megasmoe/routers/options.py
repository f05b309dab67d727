"""Every router's fields (``moe.router.*``): light dataclasses, no torch or megatron.

``megasmoe check``, ``megasmoe routers`` and config validation read a router's fields
from here without importing its module (which builds on megatron-core and takes seconds
to import); the router class itself is imported on first use through
``megasmoe.routers.registry``. Each dataclass is registered with ``@router_options``:
its router name, the module that holds the router class, and a one-line summary. A
field's docstring is its documentation (``megasmoe config-reference``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megasmoe.config import ConfigError
from megasmoe.routers.registry import router_options

__all__ = ["RouterConfigBase", "TopKConfig", "SigmoidBiasConfig", "XMoEConfig",
           "StableMoEConfig", "SMoEDropoutConfig", "DomainSteerConfig", "HyperConfig",
           "SpectralConfig", "UnifiedConfig", "CompeteConfig", "SimSMoEConfig",
           "read_steering_file", "UNIFIED_GROUPS", "COMPETE_VERSIONS", "SIMSMOE_KERNELS",
           "VQMoEConfig", "S2MoEConfig", "S2MOE_NOISE_ROUTING"]

UNIFIED_GROUPS = ("sequence", "position", "micro_batch", "causal")
"""Token groups of the ``unified`` router's cross-token top-k."""


@dataclass
class RouterConfigBase:
    """Fields shared by all router configs (none yet); subclasses add their own."""

    def transformer_config_overrides(self) -> dict:
        """TransformerConfig fields this router needs set (e.g. score function)."""
        return {}

    def validate(self, cfg) -> None:
        """Raise ConfigError for settings this router cannot run with."""


@router_options("topk", "megasmoe.routers.topk",
                "Softmax top-k router with megatron-core's aux losses (the SMoE baseline).")
@dataclass
class TopKConfig(RouterConfigBase):
    """Fields of the ``topk`` router."""

    score_function: str = "softmax"
    """softmax or sigmoid scores."""
    pre_softmax: bool = False
    """true: top-k of softmax over all experts; false: softmax over the top-k logits."""
    topk_scaling_factor: Optional[float] = None
    """Multiply the selected probabilities by this factor; null = 1."""

    def transformer_config_overrides(self) -> dict:
        return {
            "moe_router_score_function": self.score_function,
            "moe_router_pre_softmax": self.pre_softmax,
            "moe_router_topk_scaling_factor": self.topk_scaling_factor,
        }

    def validate(self, cfg) -> None:
        if self.score_function not in ("softmax", "sigmoid"):
            raise ConfigError(
                f"moe.router.score_function='{self.score_function}' is unknown; use softmax or sigmoid"
            )


@router_options("sigmoid_bias", "megasmoe.routers.baselines",
                "Sigmoid scores with aux-loss-free expert bias (DeepSeek-V3), megatron semantics.")
@dataclass
class SigmoidBiasConfig(RouterConfigBase):
    """Fields of the ``sigmoid_bias`` router (DeepSeek-V3 defaults)."""

    bias_update_rate: float = 1e-3
    """Step of the expert-bias update (sign of the load error times this rate)."""
    topk_scaling_factor: Optional[float] = None
    """Multiply the (renormalised) selected scores by this factor; null = 1."""

    def transformer_config_overrides(self) -> dict:
        return {
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_bias_update_rate": self.bias_update_rate,
            "moe_router_topk_scaling_factor": self.topk_scaling_factor,
        }


@router_options("xmoe", "megasmoe.routers.baselines",
                "X-MoE gate: low-rank projection, cosine to normalised expert embeddings.")
@dataclass
class XMoEConfig(RouterConfigBase):
    """Fields of the ``xmoe`` router (authors' defaults)."""

    reduced_dim: int = 8
    """Dimension of the low-rank routing space (W_red: d -> reduced_dim)."""
    embedding_norm: float = 1.5
    """Row norm the expert embeddings are rescaled to every forward."""
    init_gain: float = 0.32
    """Gain of the orthogonal init of the expert embeddings."""
    balance_temperature: float = 0.3
    """The balance loss uses softmax(g / balance_temperature)."""


@router_options("stablemoe", "megasmoe.routers.baselines",
                "StableMoE (stage 1) gate: x . normalize(M)^T.")
@dataclass
class StableMoEConfig(RouterConfigBase):
    """Fields of the ``stablemoe`` router (authors' defaults)."""

    init_gain: float = 0.32
    """Gain of the orthogonal init of the expert embeddings (E x d)."""
    balance_temperature: float = 0.3
    """The balance loss uses softmax(g / balance_temperature)."""


@router_options("smoe_dropout", "megasmoe.routers.baselines",
                "Frozen random router; k grows linearly during training (SMoE-Dropout).")
@dataclass
class SMoEDropoutConfig(RouterConfigBase):
    """Fields of the ``smoe_dropout`` router (authors: 8 -> 16 of 16 experts)."""

    k_start: Optional[int] = None
    """k at step 0; null = moe.num_experts // 2 (authors: 8 of 16)."""
    k_end: Optional[int] = None
    """k at the last step; null = moe.num_experts."""
    inference_k: Optional[int] = None
    """k used in evaluation; null = moe.topk."""
    schedule_steps: Optional[int] = None
    """Steps over which k grows; null = train.steps."""

    @staticmethod
    def default_k_start(num_experts: int) -> int:
        """k_start when null: half the experts, at least 1 (the authors' 8 of 16)."""
        return max(1, num_experts // 2)

    def validate(self, cfg) -> None:
        E = cfg.moe.num_experts
        self.k_start = self.k_start or self.default_k_start(E)
        self.k_end = self.k_end or E
        self.inference_k = self.inference_k or cfg.moe.topk
        self.schedule_steps = self.schedule_steps or cfg.train.steps
        for name in ("k_start", "k_end", "inference_k"):
            if not 1 <= getattr(self, name) <= E:
                raise ConfigError(f"moe.router.{name}={getattr(self, name)} must be in "
                                  f"[1, moe.num_experts={E}]")
        if cfg.moe.aux_loss_type != "none":
            raise ConfigError("moe.router.name=smoe_dropout freezes the router, so a balance "
                              "loss cannot act on it; set moe.aux_loss_type=none")


@router_options("domain_steer", "megasmoe.routers.domain_steer",
                "Router logits plus a fixed per-layer steering bias, then megatron top-k.")
@dataclass
class DomainSteerConfig(RouterConfigBase):
    """Fields of the ``domain_steer`` router (authors' defaults)."""

    file: Optional[str] = None
    """Steering file (JSON: mode, lambda, experts per layer); null = zero bias."""
    mode: Optional[str] = None
    """multiplicative (delta = log(1 + lambda)) or additive (delta = lambda); null = file's."""
    strength: Optional[float] = None
    """lambda; null = the file's (authors: 0.10)."""

    def validate(self, cfg) -> None:
        if self.file is not None:
            steering = read_steering_file(self.file, cfg.model.num_layers, cfg.moe.num_experts)
            self.mode = self.mode or steering["mode"]
            self.strength = self.strength if self.strength is not None else steering["lambda"]
        self.mode = self.mode or "multiplicative"
        self.strength = 0.10 if self.strength is None else self.strength
        if self.mode not in ("multiplicative", "additive"):
            raise ConfigError(f"moe.router.mode='{self.mode}'; use multiplicative or additive")


def read_steering_file(path: str, num_layers: int, num_experts: int) -> dict:
    """Read and check a steering file; ConfigError naming the problem otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"moe.router.file='{path}': cannot read steering JSON ({e})") from None
    experts = {}
    for layer, ids in data.get("experts", {}).items():
        layer = int(layer)
        fix = "remove it or discover the file on this model (megasmoe steer discover)"
        if not 0 <= layer < num_layers:
            raise ConfigError(f"moe.router.file='{path}': layer {layer} does not exist (the "
                              f"model has layers 0..{num_layers - 1}); {fix}")
        bad = [i for i in ids if not 0 <= i < num_experts]
        if bad:
            raise ConfigError(f"moe.router.file='{path}': layer {layer} names expert "
                              f"{bad[0]}, which does not exist (the model has experts "
                              f"0..{num_experts - 1}); {fix}")
        experts[layer] = [int(i) for i in ids]
    return {"mode": data.get("mode", "multiplicative"), "lambda": float(data.get("lambda", 0.1)),
            "experts": experts}


def _check_balance_flag(name: str, balance_loss: bool, cfg) -> None:
    """balance_loss=true needs moe.aux_loss_type=aux_loss, the only loss SpecRouters attach."""
    if balance_loss and cfg.moe.aux_loss_type != "aux_loss":
        raise ConfigError(f"moe.router.balance_loss=true (router {name}) needs "
                          f"moe.aux_loss_type=aux_loss (it is {cfg.moe.aux_loss_type}); set "
                          f"moe.aux_loss_type=aux_loss or drop moe.router.balance_loss")


@router_options("hyper", "megasmoe.routers.hyper",
                "HyperRouter: a frozen hypernetwork generates the gate from a trainable embedding.")
@dataclass
class HyperConfig(RouterConfigBase):
    """Fields of the ``hyper`` router (authors' defaults)."""

    embedding_dim: Optional[int] = None
    """d_e, size of the trainable per-layer embedding; null = hidden size (authors)."""
    hypernet_hidden: int = 64
    """Hidden width h of the frozen hypernetwork (authors: 64 small, 256 larger models)."""
    balance_loss: bool = False
    """Attach L_bal on softmax(g) (moe.aux_loss_type=aux_loss, x moe.aux_loss_coeff); the
    authors train without one (false)."""

    def validate(self, cfg) -> None:
        _check_balance_flag("hyper", self.balance_loss, cfg)


@router_options("spectral", "megasmoe.routers.spectral",
                "SSMoE: mix the learned router with scores from the experts' singular vectors.")
@dataclass
class SpectralConfig(RouterConfigBase):
    """Fields of the ``spectral`` router (authors' defaults for LLMs)."""

    c: float = 0.5
    """Mixing weight of the spectral scores (0 = the learned router alone)."""
    k_svd: int = 50
    """Singular vectors averaged per expert matrix (authors: 50 LLMs, 5 CLIP)."""
    normalize_topk: bool = True
    """Renormalise the selected probabilities to sum to 1."""

    def validate(self, cfg) -> None:
        if not 0.0 <= self.c <= 1.0:
            raise ConfigError(f"moe.router.c={self.c} must be in [0, 1]")
        if self.k_svd < 1:
            raise ConfigError("moe.router.k_svd must be >= 1")
        if cfg.moe.expert_backend == "te":
            raise ConfigError("moe.router.name=spectral reads the expert weights per expert, "
                              "which TEGroupedMLP does not expose; set "
                              "moe.expert_backend=grouped or sequential")


@router_options("unified", "megasmoe.routers.unified",
                "USMoE: unified softmax/sigmoid score, top N k (token, expert) pairs per group.")
@dataclass
class UnifiedConfig(RouterConfigBase):
    """Fields of the ``unified`` router (authors' defaults)."""

    alpha: float = 0.5
    """Weight of the sigmoid term in the unified score."""
    group: str = "sequence"
    """Token group of the cross-token top-k: sequence (authors' HF models), position (the
    micro batch's tokens at one position: authors' Transformer-XL), micro_batch or causal."""
    balance_loss: bool = False
    """Attach L_bal on softmax(g) (moe.aux_loss_type=aux_loss, x moe.aux_loss_coeff); the
    authors train without one (false)."""

    def validate(self, cfg) -> None:
        _check_balance_flag("unified", self.balance_loss, cfg)
        if self.group not in UNIFIED_GROUPS:
            raise ConfigError(f"moe.router.group='{self.group}' is unknown; use "
                              f"{', '.join(UNIFIED_GROUPS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"moe.router.alpha={self.alpha} must be in [0, 1]")
        if cfg.moe.dispatcher != "allgather":
            raise ConfigError(
                f"moe.router.name=unified gives a variable number of experts per token, which "
                f"the {cfg.moe.dispatcher} dispatcher (dropless, exactly moe.topk per token) "
                f"cannot take; set moe.dispatcher=allgather")
        if cfg.parallel.cp > 1:
            raise ConfigError("moe.router.name=unified is not supported with context "
                              "parallelism (its groups are chosen on whole sequences); set "
                              "parallel.cp=1")


COMPETE_VERSIONS = ("v1", "v2")
"""CompeteSMoE versions: v1 (Pham, Do et al. 2024), v2 (Nguyen et al. 2025)."""
_COMPETE_DEFAULTS = {
    # field: (v1, v2)
    "frequency": (1.0, 0.07),
    "max_layers": (None, 3),
    "router_loss_coeff": (0.05, 0.001),
    "diversity_coeff": (0.0, 0.005),
    "entropy_coeff": (0.0, 0.005),
    "entropy_coeff_normal": (0.0, 0.01),
}


def _refuse_flex(name: str, cfg, why: str) -> None:
    """Refuse the flex dispatcher for routers that run experts outside the dispatch."""
    if cfg.moe.dispatcher == "flex":
        raise ConfigError(f"moe.router.name={name} {why}, which megasmoe does not do through "
                          f"the flex (DeepEP) dispatcher; set moe.dispatcher=allgather or "
                          f"alltoall")


@router_options("compete", "megasmoe.routers.compete",
                "CompeteSMoE: on scheduled competition steps all experts run and tokens "
                "route by the experts' responses (v1, v2).")
@dataclass
class CompeteConfig(RouterConfigBase):
    """Fields of the ``compete`` router; null fields take the version's authors' default."""

    version: str = "v1"
    """v1 (Pham, Do et al. 2024) or v2 (Nguyen et al. 2025)."""
    frequency: Optional[float] = None
    """Competition probability per layer per step (v1; null = 1.0) / fraction of steps
    scheduled per layer (v2; null = 0.07)."""
    max_layers: Optional[int] = None
    """At most this many layers compete in one step (null: v1 no cap, v2 3)."""
    router_loss_coeff: Optional[float] = None
    """Coefficient of the router loss MSE(softmax(g), q) (null: v1 0.05 = 5 x 0.01,
    v2 0.001)."""
    topk_loss_weight: float = 0.2
    """v2: weight of the same MSE restricted to the k selected entries."""
    diversity_coeff: Optional[float] = None
    """Mean pairwise cosine of the selected experts' outputs on competition steps (null:
    v1 0, v2 0.005)."""
    entropy_coeff: Optional[float] = None
    """Entropy balance on softmax(a) on competition steps (null: v1 0, v2 0.005)."""
    entropy_coeff_normal: Optional[float] = None
    """Entropy balance on softmax(g) on the other steps (null: v1 0, v2 0.01)."""
    schedule_seed: Optional[int] = None
    """Seed of the competition schedule; null = run.seed."""

    def validate(self, cfg) -> None:
        if self.version not in COMPETE_VERSIONS:
            raise ConfigError(f"moe.router.version='{self.version}' is unknown; use v1 or v2")
        v = COMPETE_VERSIONS.index(self.version)
        for name, defaults in _COMPETE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, defaults[v])
        if self.schedule_seed is None:
            self.schedule_seed = cfg.run.seed
        if not 0.0 <= self.frequency <= 1.0:
            raise ConfigError(f"moe.router.frequency={self.frequency} must be in [0, 1]")
        if self.max_layers is not None and self.max_layers < 1:
            raise ConfigError(f"moe.router.max_layers={self.max_layers} must be >= 1 or null")
        _refuse_flex("compete", cfg, "runs every expert on competition steps")


SIMSMOE_KERNELS = ("rbf", "linear")
"""CKA kernels of the ``simsmoe`` router."""


@router_options("simsmoe", "megasmoe.routers.simsmoe",
                "SimSMoE: SMoE gate plus a CKA penalty on expert pairs that often serve "
                "the same tokens.")
@dataclass
class SimSMoEConfig(RouterConfigBase):
    """Fields of the ``simsmoe`` router (authors' defaults)."""

    cont_freq: float = 16.0
    """A pair is compared when its tracked frequency exceeds this (then reset)."""
    tau: float = 0.5
    """CKA threshold: a compared pair adds its CKA to L_sim only above tau."""
    sim_coeff: float = 0.01
    """Coefficient of L_sim: lambda (1) x the authors' 0.01 on the gate loss."""
    kernel: str = "rbf"
    """CKA kernel: rbf (authors' default) or linear."""
    sigma: float = 0.8
    """Bandwidth of the RBF kernel."""

    def validate(self, cfg) -> None:
        if cfg.moe.topk < 2:
            raise ConfigError(f"moe.router.name=simsmoe compares pairs of a token's experts; "
                              f"set moe.topk >= 2 (it is {cfg.moe.topk})")
        if self.kernel not in SIMSMOE_KERNELS:
            raise ConfigError(f"moe.router.kernel='{self.kernel}' is unknown; use rbf or linear")
        if self.sigma <= 0:
            raise ConfigError(f"moe.router.sigma={self.sigma} must be > 0")
        _refuse_flex("simsmoe", cfg, "runs experts on the tokens of compared pairs")
        if cfg.train.recompute:
            raise ConfigError("moe.router.name=simsmoe counts expert pairs in the forward, "
                              "which activation recompute would run twice; set "
                              "train.recompute=false")


@router_options("vq", "megasmoe.routers.vq",
                "VQMoE: StableMoE top-(k-1) branch plus the expert a codebook picks, mixed by a "
                "learned gate.")
@dataclass
class VQMoEConfig(RouterConfigBase):
    """Fields of the ``vq`` router (authors' defaults: giangdip2410/VQMoE, enwik8 scripts)."""

    codebook_size: Optional[int] = None
    """K, codebook entries (K x d; entry j's VQ expert is j mod E); null = max(16, moe.num_experts) (authors: 16 of 16)."""
    commitment: float = 0.25
    """Weight of the commitment term MSE(sg(C_j), x) inside L_vq."""
    contrib_rate: float = 0.05
    """x~ = (1 - contrib_rate) x + contrib_rate sg(C_j - x), the VQ expert's input."""
    vq_loss_coeff: float = 0.08
    """Coefficient of L_vq in the training loss."""
    smoe_topk: Optional[int] = None
    """Experts per token of the SMoE branch; null = moe.topk - 1 (with the VQ expert, moe.topk in all)."""
    init_gain: float = 0.32
    """Gain of the orthogonal init of the SMoE branch's expert embeddings (StableMoE gate)."""
    balance_temperature: float = 0.3
    """The SMoE branch's balance loss uses softmax(g / balance_temperature)."""

    def validate(self, cfg) -> None:
        E, k = cfg.moe.num_experts, cfg.moe.topk
        if self.smoe_topk is None:
            if k < 2:
                raise ConfigError(
                    "moe.router.name=vq counts its VQ expert among the moe.topk experts per "
                    "token, so moe.topk=1 leaves none for the SMoE branch; set moe.topk=2 "
                    "(top-1 + 1 VQ expert, the authors') or moe.router.smoe_topk=1")
            self.smoe_topk = k - 1
        if not 1 <= self.smoe_topk <= E:
            raise ConfigError(f"moe.router.smoe_topk={self.smoe_topk} must be in "
                              f"[1, moe.num_experts={E}]")
        if self.codebook_size is None:
            self.codebook_size = max(16, E)
        if self.codebook_size < E:
            raise ConfigError(
                f"moe.router.codebook_size={self.codebook_size} is under moe.num_experts={E}: "
                f"experts {self.codebook_size}..{E - 1} could never be a VQ expert (entry j "
                f"picks expert j mod E); set moe.router.codebook_size>={E}")
        if not 0.0 <= self.contrib_rate <= 1.0:
            raise ConfigError(f"moe.router.contrib_rate={self.contrib_rate} must be in [0, 1]")
        for name in ("commitment", "vq_loss_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.router.{name}={getattr(self, name)} must be >= 0")
        _refuse_flex("vq", cfg, "runs its VQ expert through layer.run_experts")

    def transformer_config_overrides(self) -> dict:
        # The layer's dispatcher routes smoe_topk experts per token for the SMoE branch; the
        # VQ expert goes through a second dispatch of one expert per token. megatron
        # refuses top-1 without pre_softmax, which only its own routing (not used) reads.
        if self.smoe_topk is None:
            return {}
        return {"moe_router_topk": self.smoe_topk, "moe_router_pre_softmax": True}


S2MOE_NOISE_ROUTING = ("own", "shared")
"""How the noisy copy is routed: by the gate on x_n (own) or with x's experts (shared)."""


@router_options("stochastic", "megasmoe.routers.stochastic",
                "S2MoE: SMoE on x and on a Gaussian-noised copy, mixed by a learned gate, "
                "InfoNCE between the two; fewer experts at inference.")
@dataclass
class S2MoEConfig(RouterConfigBase):
    """Fields of the ``stochastic`` router. No public code: every default is inferred from
    the paper's abstract (megasmoe/routers/stochastic.py lists each inference)."""

    noise_mul_mean: float = 0.0
    """(inferred) eps1 = noise_mul_mean + noise_mul_std n, n ~ N(0, I) in x_n = x * eps1 + eps2."""
    noise_mul_std: float = 1.0
    """(inferred) Std of the multiplicative noise eps1."""
    noise_add_std: float = 1.0
    """(inferred) Std of the additive noise eps2 ~ N(0, noise_add_std^2 I)."""
    noise_routing: str = "own"
    """(inferred) own: the gate routes x_n itself; shared: x_n goes to x's experts."""
    uncertainty_loss_coeff: float = 0.01
    """(inferred) Coefficient of the InfoNCE uncertainty loss between y_d and y_n."""
    infonce_temperature: float = 0.07
    """(inferred) InfoNCE temperature (0.07 as in the same authors' VQMoE contrastive loss)."""
    infonce_symmetric: bool = False
    """(inferred) false: anchors y_d against y_n of the sequence; true: average both directions."""
    inference_k: Optional[int] = None
    """(inferred) Experts per token in evaluation (y_d only, no noise); null = max(1, moe.topk // 2)."""

    @staticmethod
    def default_inference_k(topk: int) -> int:
        """inference_k when null: half of moe.topk, at least 1 (inferred)."""
        return max(1, topk // 2)

    def validate(self, cfg) -> None:
        E = cfg.moe.num_experts
        if self.noise_routing not in S2MOE_NOISE_ROUTING:
            raise ConfigError(f"moe.router.noise_routing='{self.noise_routing}' is unknown; use "
                              f"{' or '.join(S2MOE_NOISE_ROUTING)}")
        if self.infonce_temperature <= 0:
            raise ConfigError(f"moe.router.infonce_temperature={self.infonce_temperature} must "
                              f"be > 0")
        for name in ("noise_mul_std", "noise_add_std", "uncertainty_loss_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.router.{name}={getattr(self, name)} must be >= 0")
        if self.inference_k is None:
            self.inference_k = self.default_inference_k(cfg.moe.topk)
        if not 1 <= self.inference_k <= E:
            raise ConfigError(f"moe.router.inference_k={self.inference_k} must be in "
                              f"[1, moe.num_experts={E}]")
        if cfg.parallel.cp > 1:
            raise ConfigError("moe.router.name=stochastic contrasts the tokens of whole "
                              "sequences (InfoNCE), which context parallelism splits; set "
                              "parallel.cp=1")
        _refuse_flex("stochastic", cfg, "runs its noisy pass through layer.run_experts")
        self.seed = cfg.run.seed  # the noise streams derive from the run's seed
