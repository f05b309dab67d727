"""Target architectures, in the order export tries them, and lookup by model_type."""

from __future__ import annotations

from megasmoe.convert.archs.base import Arch, ImportedModel, Tensors
from megasmoe.convert.archs.glm4_moe import Glm4Moe
from megasmoe.convert.archs.gpt_oss import GptOss
from megasmoe.convert.archs.mixtral import Mixtral
from megasmoe.convert.archs.olmoe import Olmoe
from megasmoe.convert.archs.qwen2_moe import Qwen2Moe
from megasmoe.convert.archs.qwen3_moe import Qwen3Moe
from megasmoe.convert.archs.remote import MODELING_FILE, MegasmoeRemote
from megasmoe.convert.errors import ConversionError

__all__ = ["Arch", "ImportedModel", "Tensors", "EXPORT_TARGETS", "REMOTE_TARGET", "MODELING_FILE",
           "arch_for_model_type"]

EXPORT_TARGETS: tuple[Arch, ...] = (Mixtral(), Qwen2Moe(), Glm4Moe(), Olmoe(), Qwen3Moe(),
                                    GptOss())
"""Tried in order: the first that holds the model exactly is written. GPT-OSS comes last:
it is the one with a router logit bias, and its up projection costs a rounding (+1)."""

REMOTE_TARGET = MegasmoeRemote()
"""Tried only with ``remote_code`` (needs trust_remote_code to load): first for a router
logit bias, last otherwise."""

_ALL = {a.model_type: a for a in EXPORT_TARGETS}


def arch_for_model_type(model_type: str) -> Arch:
    """The architecture of an HF config's model_type; ConversionError if unsupported."""
    if model_type not in _ALL:
        importable = sorted(t for t, a in _ALL.items() if a.importable)
        raise ConversionError(f"model_type={model_type!r} is not supported for import "
                              f"(supported: {', '.join(importable)})")
    return _ALL[model_type]
