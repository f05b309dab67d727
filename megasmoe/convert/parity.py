"""``verify``: the same token ids through megasmoe's megatron model and the HF model.

The megatron model is built at world size 1 in fp32 on CPU from the checkpoint's config
and loaded with megatron's own resharding load (any saved layout); the HF model is
loaded with ``AutoModelForCausalLM.from_pretrained`` in fp32 (no remote code, except
megasmoe's own architecture, ``model_type: megasmoe_moe``, whose modeling file the
export wrote).

For token ids x [B, S+1]: megatron runs on x[:, :S] with labels x[:, 1:] (its own
per-token loss); HF runs on x with labels x (it shifts internally, and causality makes
its logits at positions < S those of x[:, :S]). Logits are compared over the real
vocabulary (megatron's padded rows are dropped); the megatron loss is reported over the
padded vocabulary (what training logged) and over the real one (what HF computes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megasmoe.convert.errors import ConversionError
from megasmoe.convert.reader import checkpoint_problems, resolve_checkpoint
from megasmoe.convert.runtime import single_process, single_process_config

__all__ = ["VerifyReport", "verify", "megatron_logits", "hf_logits", "random_token_ids",
           "text_token_ids"]


@dataclass
class VerifyReport:
    """Logit parity of a megasmoe checkpoint and an HF directory on one batch."""

    max_abs_logit_diff: float
    next_token_agreement: float
    megatron_loss: float
    """Megatron's own loss (softmax over the padded vocabulary, as in training)."""
    megatron_loss_unpadded: float
    """The same over the real vocabulary: the number the HF loss should equal."""
    hf_loss: float
    tokens: int

    def summary(self) -> str:
        """One line per number, for the CLI."""
        return (f"max |logit difference|  {self.max_abs_logit_diff:.3e}\n"
                f"next-token agreement    {self.next_token_agreement:.4f} "
                f"({self.tokens} positions)\n"
                f"loss: megasmoe {self.megatron_loss:.6f} (real vocab "
                f"{self.megatron_loss_unpadded:.6f}), HF {self.hf_loss:.6f}")


def text_token_ids(hf_dir: str | Path, text: str, batch: int = 2,
                   length: int = 33) -> torch.Tensor:
    """``text`` tokenised by the export's own tokenizer, as up to ``batch`` rows of
    ``length`` consecutive tokens [rows, length]; ConversionError when the export has no
    tokenizer or the text is shorter than one row."""
    if not (Path(hf_dir) / "tokenizer_config.json").is_file():
        raise ConversionError(f"{hf_dir} has no tokenizer (a mock-data run exports none); "
                              f"pass token ids with --tokens instead of --text")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(hf_dir))(text, add_special_tokens=False)["input_ids"]
    rows = min(batch, len(ids) // length)
    if rows == 0:
        raise ConversionError(f"the text gives {len(ids)} tokens, fewer than one row of "
                              f"--length {length}; give more text or a smaller --length")
    return torch.tensor(ids[:rows * length]).reshape(rows, length)


def random_token_ids(vocab_size: int, batch: int = 2, length: int = 33,
                     seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random token ids [batch, length] from [0, vocab_size)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def _as_ids(token_ids) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ConversionError("token_ids must be [batch, length] with length >= 2")
    return ids


def _load_megatron(ckpt_dir: Path, cfg):
    from megatron.core import dist_checkpointing

    from megasmoe.checkpoint import SHARDING_METADATA
    from megasmoe.model import build_model_chunks, to_transformer_config

    tc = to_transformer_config(cfg)
    (model,) = build_model_chunks(cfg, tc)
    sharded = model.sharded_state_dict(metadata=SHARDING_METADATA)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    # load() also returns the checkpoint's common (non-sharded) state: keep the model's.
    model.load_state_dict({k: loaded[k] for k in sharded}, strict=True)
    return model.eval()


def megatron_logits(run_or_checkpoint, token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, S, vocab] over the real vocabulary, per-token loss [B, S]) of megasmoe's
    own model on x[:, :-1] with labels x[:, 1:], plus padded-vocab logits' loss."""
    from megasmoe.checkpoint import read_meta

    ids = _as_ids(token_ids)
    ckpt_dir = resolve_checkpoint(run_or_checkpoint)
    problems = checkpoint_problems(ckpt_dir)
    if problems:
        raise ConversionError(f"checkpoint {ckpt_dir} is incomplete: {' | '.join(problems)}")
    meta = read_meta(ckpt_dir)
    cfg = single_process_config(meta["config"])
    with single_process(cfg), torch.no_grad():
        model = _load_megatron(ckpt_dir, cfg)
        tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, position_ids, None).float()
        loss = model(tokens, position_ids, None, labels=labels).float()
    return logits, loss


def hf_logits(hf_dir, token_ids) -> tuple[torch.Tensor, float]:
    """(logits [B, S, vocab] at positions 0..S-1, HF's own loss) of an HF directory."""
    from transformers import AutoModelForCausalLM

    ids = _as_ids(token_ids)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    model, info = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, output_loading_info=True,
        trust_remote_code=config.get("model_type") == "megasmoe_moe")
    bad = {k: sorted(v) for k, v in info.items() if v}
    if bad:
        raise ConversionError(f"transformers loaded {hf_dir} with problems: {bad}")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.logits[:, :-1].float(), float(out.loss)


def verify(run_or_checkpoint: str | Path, hf_dir: str | Path,
           token_ids: Optional[Sequence] = None) -> VerifyReport:
    """Compare megasmoe and HF on ``token_ids`` ([B, S+1]; default: fixed random ids)."""
    from megasmoe.checkpoint import read_meta

    ckpt_dir = resolve_checkpoint(run_or_checkpoint)
    vocab = read_meta(ckpt_dir)["config"]["model"]["vocab_size"]
    ids = _as_ids(random_token_ids(vocab) if token_ids is None else token_ids)
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ConversionError(f"token ids must lie in [0, {vocab})")
    m_logits, m_loss = megatron_logits(ckpt_dir, ids)
    h_logits, h_loss = hf_logits(hf_dir, ids)
    labels = ids[:, 1:]
    real = m_logits[..., :vocab]
    if real.shape != h_logits.shape:
        raise ConversionError(f"logit shapes differ: megasmoe {list(real.shape)}, HF "
                              f"{list(h_logits.shape)}")
    unpadded = F.cross_entropy(real.reshape(-1, vocab), labels.reshape(-1)).item()
    agree = (real.argmax(-1) == h_logits.argmax(-1)).float().mean().item()
    return VerifyReport(
        max_abs_logit_diff=(real - h_logits).abs().max().item(),
        next_token_agreement=agree, megatron_loss=m_loss.mean().item(),
        megatron_loss_unpadded=unpadded, hf_loss=h_loss, tokens=labels.numel())
