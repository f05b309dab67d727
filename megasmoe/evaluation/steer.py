"""DSMoE expert discovery: the math, the calibration text and the steering file.

The method (docs/steering.md; ../shared/reference/routers.md, DSMoE; the authors'
giangdip2410/Domain-specific-Experts): for each domain's calibration tokens,

- token importance = ||grad_emb L_LM (.) emb||_2 (gradient of the language-model loss
  with respect to the input embeddings, times the embeddings, L2 over the hidden size);
- important = importance above the domain's 15th percentile (over all its tokens) and
  the token is neither a stopword nor punctuation (``is_filler``);
- per (layer, expert): n_important / n_unimportant = the important / other tokens the
  router sends to that expert (its top-k, recomputed in fp32);
  s = (n_important - n_unimportant) * p_e with p_e = count_{l,e} / sum of all counts;
- the global top-N (layer, expert) pairs of the target domain are steered.

Everything here is plain Python/torch, no megatron-core: the model pass that produces
the importances and the router choices is ``megasmoe.evaluation.steer_run``.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from pathlib import Path
from typing import Sequence

import torch


__all__ = ["STOPWORDS", "IMPORTANCE_PERCENTILE", "FORMAT", "token_importance", "is_filler",
           "important_tokens", "pair_scores", "top_pairs", "steering_document",
           "write_steering_file", "domain_windows", "Windows"]

IMPORTANCE_PERCENTILE = 15.0
"""Tokens at or below this percentile of a domain's importances are unimportant."""

FORMAT = "megasmoe-steering/1"
"""The ``format`` field of a discovered steering file."""

# NLTK's English stopword list (nltk.corpus.stopwords.words("english"), 179 words), the
# list the authors' code uses; embedded because the NLTK corpus is a separate download.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their
theirs themselves what which who whom this that that'll these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until
while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why
how all any both each few more most other some such no nor not only own same so than too
very s t can will just don don't should should've now d ll m o re ve y ain aren aren't
couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma
mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren
weren't won won't wouldn wouldn't
""".split())
"""Stopwords: NLTK's English list (the DSMoE authors' choice)."""

_PUNCTUATION = frozenset(string.punctuation)


# ---------------------------------------------------------------------------- the math


def token_importance(grad: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """||grad (.) emb||_2 over the last (hidden) dimension, in fp32 (fp64 in, fp64 out)."""
    dtype = torch.float64 if emb.dtype == torch.float64 else torch.float32
    return (grad.to(dtype) * emb.to(dtype)).norm(dim=-1)


def is_filler(text: str) -> bool:
    """A token that is never important: a stopword, punctuation, or only whitespace.

    ``text`` is the token decoded alone; it is stripped and lower-cased first (as the
    authors do). Punctuation is any non-empty run of ASCII punctuation characters.
    """
    t = text.strip().lower()
    return not t or t in STOPWORDS or all(c in _PUNCTUATION for c in t)


def important_tokens(importance: torch.Tensor, filler: torch.Tensor,
                     percentile: float = IMPORTANCE_PERCENTILE) -> torch.Tensor:
    """Boolean mask: importance above the ``percentile``-th percentile (numpy's linear
    interpolation over all given tokens) and not a filler token."""
    import numpy as np

    values = importance.detach().to(torch.float64).cpu().numpy().reshape(-1)
    threshold = float(np.percentile(values, percentile)) if values.size else 0.0
    return (importance.to(torch.float64) > threshold) & ~filler


def pair_scores(n_important: torch.Tensor, n_total: torch.Tensor) -> torch.Tensor:
    """s[l, e] = (n_important - n_unimportant) * p_e, p_e = count_{l,e} / sum of all counts.

    Counts are [layers, experts] (int or float); the sum runs over every (layer, expert)
    pair, as in the authors' code (per layer would only rescale each layer equally when
    all layers are MoE layers).
    """
    n_important = n_important.to(torch.float64)
    n_total = n_total.to(torch.float64)
    total = n_total.sum()
    p = n_total / total if total > 0 else torch.zeros_like(n_total)
    return (n_important - (n_total - n_important)) * p


def top_pairs(scores: torch.Tensor, moe_layers: Sequence[int], n: int) -> list[tuple[int, int, float]]:
    """The ``n`` highest-scoring (layer, expert, score) over the MoE layers, best first.

    Ties go to the lower layer, then the lower expert, so the choice is deterministic.
    """
    pairs = [(layer, e, float(scores[layer, e])) for layer in moe_layers
             for e in range(scores.shape[1])]
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return pairs[:n]


# ---------------------------------------------------------------------------- the file


def steering_document(target: str, chosen: list[tuple[int, int, float]], mode: str,
                      lam: float, domains: dict, provenance: dict) -> dict:
    """The steering file's content: ``read_steering_file``'s fields (mode, lambda,
    experts) plus the target domain, the chosen pairs with scores, every domain's
    per-layer scores and counts, and provenance."""
    experts: dict[str, list[int]] = {}
    for layer, e, _ in sorted(chosen, key=lambda p: (p[0], p[1])):
        experts.setdefault(str(layer), []).append(e)
    return {
        "format": FORMAT,
        "mode": mode,
        "lambda": lam,
        "delta": math.log1p(lam) if mode == "multiplicative" else lam,
        "domain": target,
        "experts": experts,
        "pairs": [{"layer": layer, "expert": e, "score": s} for layer, e, s in chosen],
        "domains": domains,
        "provenance": provenance,
    }


def write_steering_file(doc: dict, path: Path) -> None:
    """Write ``doc`` as JSON (stable key order, no timestamps): temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # One line per list of numbers and per flat object (a pair): json's indent puts
    # every number on a line of its own.
    text = re.sub(r"([\[{])\s+([^\[\]{}]*?)\s+([\]}])",
                  lambda m: m.group(1) + " ".join(m.group(2).split()) + m.group(3),
                  json.dumps(doc, indent=1))
    tmp.write_text(text + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------- the windows


class Windows:
    """A domain's calibration tokens cut into fixed-length windows.

    ``tokens``/``labels`` [W, S] int64; ``valid`` [W, S] bool (a real input token, not
    padding); ``loss_mask`` [W, S] float (the label exists).
    """

    def __init__(self, tokens, labels, valid, loss_mask):
        self.tokens, self.labels, self.valid, self.loss_mask = tokens, labels, valid, loss_mask

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def padded(self, count: int, pad_id: int) -> "Windows":
        """The same windows plus padding windows (no valid token) up to ``count``."""
        extra = count - len(self)
        if extra <= 0:
            return self
        S = self.tokens.shape[1]
        pad = torch.full((extra, S), pad_id, dtype=torch.long)
        none = torch.zeros(extra, S)
        return Windows(torch.cat([self.tokens, pad]), torch.cat([self.labels, pad]),
                       torch.cat([self.valid, none.bool()]), torch.cat([self.loss_mask, none]))


def domain_windows(docs: list[str], tokenizer, seq_length: int, max_tokens: int) -> Windows:
    """Documents tokenized and joined with the EOD token (as preprocessing does), the
    first ``max_tokens`` tokens cut into windows of ``seq_length`` (the last one padded
    with EOD and masked). Each window predicts its next tokens (labels shifted by one)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eod)
        if len(ids) > max_tokens:
            break
    ids = ids[:max_tokens + 1]
    n_in = len(ids) - 1 if len(ids) > 1 else len(ids)
    W = max(1, math.ceil(n_in / seq_length))
    flat = torch.full((W * seq_length + 1,), tokenizer.eod, dtype=torch.long)
    flat[:len(ids)] = torch.tensor(ids, dtype=torch.long)
    positions = torch.arange(W * seq_length)
    tokens = flat[:-1].view(W, seq_length)
    labels = flat[1:].view(W, seq_length)
    valid = (positions < n_in).view(W, seq_length)
    loss_mask = (positions + 1 < len(ids)).view(W, seq_length).float()
    return Windows(tokens.clone(), labels.clone(), valid, loss_mask)
