"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

``SDPAttention`` takes the place of megatron-core's ``DotProductAttention`` in the
local layer spec (``model.attention``: ``auto`` picks it when Transformer Engine does
not import). Same contract: built by ``SelfAttention`` with (config, layer_number,
attn_mask_type, attention_type, cp_comm_type, softmax_scale, pg_collection); called
with query [sq, b, heads, dim], key and value [sk, b, groups, dim] holding this
tensor-parallel rank's heads; returns [sq, b, heads x dim]. No parameters, so
checkpoints do not change.

What SDPA computes differently from DotProductAttention, and where it matches:

- One call instead of baddbmm -> masked softmax -> dropout -> bmm. On GPU it runs
  the flash or memory-efficient kernel (no [b, heads, sq, sk] score tensor); on CPU,
  torch's fused CPU kernel. fp32: equal to DotProductAttention within ~1e-6.
- Causal mask: ``is_causal`` (upper-left aligned, as megatron's default causal mask)
  when megatron passes no mask; an explicit boolean mask (megatron's True = masked)
  is inverted into SDPA's True = attend and used alone, as megatron's softmax does.
  (A query whose every key is masked differs: megatron fills -10000 and averages all
  values, SDPA fills -inf; no megasmoe path builds such a row.)
- Scale: ``softmax_scale`` or head_dim^-0.5. ``apply_query_key_layer_scaling`` only
  moves a factor layer_number between the matmul and an fp32 softmax in megatron; the
  product is the same scale, which is what SDPA gets.
- bf16: megatron multiplies q k^T in bf16 into a bf16 score tensor, takes the softmax
  in fp32 and casts the probabilities to bf16. The GPU kernels accumulate q k^T and
  the softmax in fp32 without a bf16 score tensor and cast the probabilities to bf16
  for p v: one rounding fewer. Measured on CPU (tests/test_attention.py): both within
  2^-6 of the largest value of each other and of fp64; not yet measured on GPU.
- GQA: key/value groups are shared by ``enable_gqa`` (no copies) where torch has it
  (>= 2.5), else repeated like megatron does.
- Dropout (``model.dropout`` > 0, training only): SDPA's ``dropout_p``, under the
  same RNG stream as megatron (the tensor-parallel RNG tracker's fork unless sequence
  parallel is on). The masks are drawn differently from ``torch.nn.Dropout``'s, so
  with dropout the two paths agree in distribution, not bit for bit.

Refused at construction, in one line: context parallelism (SDPA sees only this
rank's part of the sequence), window attention, softmax types other than vanilla,
mask types other than causal / padding / no_mask; at call time: attention bias,
packed sequences and non-boolean masks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

__all__ = ["SDPAttention", "SDPA_HAS_GQA"]

SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
"""torch >= 2.5: SDPA shares key/value heads among query heads itself."""

_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.padding, AttnMaskType.no_mask)


class SDPAttention(MegatronModule):
    """megatron-core core attention (DotProductAttention's contract) on torch SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention has no context parallelism; use Transformer "
                             "Engine attention (model.attention=auto with TE) or parallel.cp=1")
        if config.window_size is not None:
            raise ValueError("SDPAttention has no sliding-window attention; "
                             "use model.attention=unfused")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, "
                             f"not {config.softmax_type!r}")
        self._check_mask_type(attn_mask_type)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        self.hidden_size_per_partition = self.heads_per_partition * head_dim
        # layer scaling divides by layer_number before an fp32 softmax that multiplies
        # it back (megatron): the net scale is this one.
        self.softmax_scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    @staticmethod
    def _check_mask_type(mask_type: AttnMaskType) -> None:
        if mask_type not in _MASK_TYPES:
            raise ValueError(f"SDPAttention supports attn_mask_type causal, padding or "
                             f"no_mask, not {mask_type.name}; use model.attention=unfused")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """[sq, b, heads, dim], [sk, b, groups, dim] x2 -> [sq, b, heads x dim]."""
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not take packed sequences (thd); "
                             "use Transformer Engine attention")
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        self._check_mask_type(mask_type)
        sq, sk = query.size(0), key.size(0)
        mask, causal = None, False
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(f"SDPAttention takes megatron's boolean attention mask "
                                 f"(True = masked), not {attention_mask.dtype}")
            # megatron: True = masked out (filled before the softmax); SDPA: True = kept.
            mask = ~attention_mask
        elif mask_type == AttnMaskType.causal and sq > 1:
            # megatron builds the causal mask only for sq > 1 (sq == 1: one new token
            # attends to every cached key) and only for self attention.
            if sq != sk:
                raise ValueError(f"causal attention needs sq == sk, got {sq} and {sk}")
            causal = True

        q = query.permute(1, 2, 0, 3)  # [b, heads, sq, dim]
        k = key.permute(1, 2, 0, 3)  # [b, groups, sk, dim]
        v = value.permute(1, 2, 0, 3)
        extra = {}
        repeats = self.heads_per_partition // self.groups_per_partition
        if repeats > 1:
            if SDPA_HAS_GQA:
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(repeats, dim=1)
                v = v.repeat_interleave(repeats, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                scale=self.softmax_scale, **extra)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as megatron's DotProductAttention: heads differ per TP rank,
            # so their dropout draws from the tensor-parallel RNG state.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, heads, sq, dim] -> [sq, b, heads x dim]
        return context.permute(2, 0, 1, 3).reshape(sq, query.size(1), self.hidden_size_per_partition)
