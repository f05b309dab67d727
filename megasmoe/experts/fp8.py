"""FP8 expert GEMMs: float8 quantisation with dynamic scales, and the autograd Function.

Plain tensor functions first (``quantize``, ``fp8_mm``), then ``Fp8GroupedLinear``, the
autograd Function the ``grouped`` expert backend calls per projection when
``train.fp8`` is set. Nothing here holds state: every scale is computed from the tensor
it scales, at every call (dynamic scaling), so there is no amax history to go stale,
to checkpoint or to restore.

Recipes (``train.fp8``):

``tensorwise``
    one scale per GEMM operand: per expert for the weight, per expert group of tokens
    for the activations (each expert's GEMM is its own GEMM).
``rowwise``
    one scale per row of the activations (per token) and per column of the
    ``[in, out]`` weight operand (per output feature of ``W``), so one outlier token or
    feature does not flatten the resolution of the others.

Which GEMM runs in which precision (y = x W^T, per expert):

=========  ====================================  =========================================
GEMM       tensorwise                            rowwise
=========  ====================================  =========================================
forward    x e4m3 x W e4m3, fp32 accumulation    x e4m3 (per token) x W e4m3 (per out row)
dgrad      dy e5m2 x W e4m3 (wider range of      dy e4m3 (per token) x W e4m3 (per input
           gradients; TE's "hybrid" format)      column: re-quantised along the other axis)
wgrad      dy^T x in the input dtype (fp32 or    same
           bf16, fp32 accumulation)
=========  ====================================  =========================================

The weight gradient stays in high precision, as in torchao's ``rowwise_with_gw_hp``
recipe: its contraction runs over the tokens routed to an expert, where the scale of
one token row would otherwise be shared by the whole sum, and it is the gradient the
optimizer integrates over all steps. Master weights and optimizer state are the
parameters' own (fp32 or bf16); the router never sees FP8.

On CPU the GEMMs are real float8 arithmetic: ``torch._scaled_mm`` on float8 operands
(torch >= 2.13 runs it on CPU through oneDNN). On CUDA (sm89+) the same call runs on the
tensor cores; torch's scaled *grouped* GEMM (``torch._scaled_grouped_mm``) is used for
``rowwise`` when it exists, else one ``_scaled_mm`` per expert.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["E4M3", "E5M2", "RECIPES", "fmax", "quantize", "fp8_mm", "Fp8GroupedLinear"]

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")
_EPS = 1e-12


def fmax(dtype: torch.dtype) -> float:
    """Largest finite value of a float8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def quantize(x: torch.Tensor, dtype: torch.dtype = E4M3,
             dim: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with x ~= q * scale, q in ``dtype``; amax over all of x (dim None) or
    along ``dim`` (one scale per slice, keepdim). The scale is fp32 and maps the amax
    onto the dtype's largest finite value."""
    xf = x.float()
    amax = xf.abs().amax() if dim is None else xf.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp(min=_EPS) / fmax(dtype)
    q = (xf / scale).clamp(-fmax(dtype), fmax(dtype)).to(dtype).contiguous()
    return q, scale


def fp8_mm(a: torch.Tensor, b: torch.Tensor, recipe: str, a_dtype: torch.dtype = E4M3,
           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T in float8 (a in ``a_dtype``, b in e4m3), fp32 accumulation.

    ``rowwise``: scales per row of a and per row of b (= per column of b^T); the
    contraction axis K carries no scale, as ``_scaled_mm`` requires.
    """
    out_dtype = out_dtype or a.dtype
    if a.shape[0] == 0 or b.shape[0] == 0:
        return a.new_zeros(a.shape[0], b.shape[0], dtype=out_dtype)
    rowwise = recipe == "rowwise"
    qa, sa = quantize(a, a_dtype, dim=-1 if rowwise else None)
    qb, sb = quantize(b, E4M3, dim=-1 if rowwise else None)
    # CUDA's rowwise kernel writes bf16 only; CPU writes any float dtype.
    mm_dtype = torch.bfloat16 if rowwise and a.is_cuda else out_dtype
    # _scaled_mm wants b as a column-major [K, N]: the transpose of row-major [N, K].
    out = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t() if rowwise else sb,
                           out_dtype=mm_dtype)
    return out.to(out_dtype)


@functools.lru_cache(maxsize=None)
def _scaled_grouped_mm_usable(device_type: str) -> bool:
    """torch's scaled grouped GEMM runs here (CUDA, sm90+), probed once with uneven and
    empty groups; else the forward runs one ``_scaled_mm`` per expert."""
    if device_type != "cuda" or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    try:
        x = torch.randn(40, 32, device=device_type)
        w = torch.randn(3, 32, 32, device=device_type)
        _rowwise_grouped_cuda(x, w, [7, 0, 33])
    except Exception:  # noqa: BLE001 - unsupported architecture or signature
        return False
    return True


def _rowwise_grouped_cuda(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Forward of the rowwise recipe on CUDA: one scaled grouped GEMM over all experts."""
    qx, sx = quantize(x, E4M3, dim=-1)                          # [T, K], [T, 1]
    qw, sw = quantize(w, E4M3, dim=-1)                          # [E, N, K], [E, N, 1]
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    out = torch._scaled_grouped_mm(qx, qw.transpose(-2, -1), sx.squeeze(-1),
                                   sw.squeeze(-1), offs=offs, out_dtype=torch.bfloat16)
    return out.to(x.dtype)


class Fp8GroupedLinear(torch.autograd.Function):
    """y_e = x_e W_e^T for each expert's rows x_e, with float8 forward and dgrad GEMMs.

    x: [T, K] tokens grouped by expert (``counts`` rows each, in order); w: [E, N, K].
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int], recipe: str):
        ctx.save_for_backward(x, w)
        ctx.counts, ctx.recipe = counts, recipe
        if recipe == "rowwise" and _scaled_grouped_mm_usable(x.device.type) and x.shape[0]:
            return _rowwise_grouped_cuda(x, w, counts)
        parts = torch.split(x, counts)
        return torch.cat([fp8_mm(part, w[e], recipe) for e, part in enumerate(parts)])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        # tensorwise: gradients in e5m2 (range over precision); rowwise: e4m3 per token.
        grad_dtype = E5M2 if ctx.recipe == "tensorwise" else E4M3
        dx_parts, dw = [], torch.zeros_like(w)
        for e, (x_e, dy_e) in enumerate(zip(torch.split(x, ctx.counts),
                                            torch.split(dy, ctx.counts))):
            if ctx.needs_input_grad[0]:
                # dx_e = dy_e W_e: W_e^T [K, N] quantised along the contraction's other axis.
                dx_parts.append(fp8_mm(dy_e, w[e].t(), ctx.recipe, a_dtype=grad_dtype,
                                       out_dtype=x.dtype))
            if ctx.needs_input_grad[1] and x_e.shape[0]:
                dw[e] = (dy_e.t() @ x_e).to(w.dtype)  # wgrad in high precision
        dx = torch.cat(dx_parts) if ctx.needs_input_grad[0] else None
        return dx, dw if ctx.needs_input_grad[1] else None, None, None
