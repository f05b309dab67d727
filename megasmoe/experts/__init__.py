"""Expert backends of the MoE layers (``moe.expert_backend``) and FP8 expert GEMMs.

* ``sequential``: megatron-core's ``SequentialMLP``, one MLP per local expert (the
  reference; what megatron's layer spec builds).
* ``grouped``: ``GroupedMLP`` (grouped.py), one torch grouped GEMM per projection over
  megatron's permuted token layout, CPU and GPU, fp32 and bf16, expert-tensor parallel,
  optionally FP8 (``train.fp8``, fp8.py).
* ``te``: megatron-core's ``TEGroupedMLP`` (Transformer Engine's GroupedLinear), chosen
  through ``TransformerConfig.moe_grouped_gemm`` in ``model.to_transformer_config``.

All three store the same checkpoint tensors (global expert ids), so a checkpoint moves
between them and the HF export does not depend on the backend. See docs/experts.md.
"""

from __future__ import annotations

__all__ = ["experts_spec", "local_expert_weights", "build_experts"]


def experts_spec(cfg, default):
    """The ``MoESubmodules.experts`` spec for ``cfg.moe.expert_backend``; ``default`` is
    the spec megatron's layer spec built (SequentialMLP, or TEGroupedMLP for ``te``)."""
    if cfg.moe.expert_backend != "grouped":
        return default
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megasmoe.experts.grouped import GroupedMLP

    return ModuleSpec(module=GroupedMLP, params={"fp8": cfg.train.fp8})


def local_expert_weights(experts) -> list[tuple]:
    """[(fc1 [2I/etp, H], fc2 [H, I/etp])] of each local expert, for SequentialMLP and
    GroupedMLP alike (views, not copies)."""
    from megasmoe.experts.grouped import GroupedMLP

    if isinstance(experts, GroupedMLP):
        return list(zip(experts.weight1, experts.weight2))
    if hasattr(experts, "local_experts"):
        return [(m.linear_fc1.weight, m.linear_fc2.weight) for m in experts.local_experts]
    raise TypeError(f"{type(experts).__name__} does not expose per-expert weights")


def build_experts(cfg, tc):
    """The experts module of the first MoE layer as megasmoe's layer spec builds it for
    ``cfg`` (benchmarks and checks; megatron's process groups must be initialised)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megasmoe.model import decoder_block_spec

    spec = decoder_block_spec(tc, cfg).layer_specs[0].submodules.mlp.submodules.experts
    return build_module(spec, cfg.moe.num_experts // cfg.parallel.ep, tc,
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups())
