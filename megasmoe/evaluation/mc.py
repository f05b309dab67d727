"""Multiple-choice scoring by answer log-likelihood (lm-evaluation-harness' convention).

Pure functions. For a context and a choice: the context's trailing whitespace moves to
the front of the choice; whole = encode(context + choice), ctx = encode(context), the
continuation is whole[len(ctx):]; an empty context is the EOD token. The choice's
log-likelihood is the sum of log p(token | everything before) over the continuation.
acc: the highest log-likelihood is the answer; acc_norm: the highest log-likelihood per
byte of the choice (UTF-8) is.
"""

from __future__ import annotations

from typing import Callable, Sequence

from megasmoe.data.errors import DataError

__all__ = ["encode_pair", "request_tokens", "continuation_loglik", "build_requests",
           "score_items", "accuracy"]


def encode_pair(encode: Callable[[str], list], context: str, choice: str,
                eod: int) -> tuple[list, list]:
    """(context ids, continuation ids) of one choice, as lm-eval's ``_encode_pair``."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    if not context:
        return [eod], list(encode(choice))
    whole = list(encode(context + choice))
    ctx = list(encode(context))
    return ctx, whole[len(ctx):]


def request_tokens(ctx: Sequence[int], cont: Sequence[int], max_len: int) -> list:
    """The token sequence to score: context + continuation, cut from the left to
    ``max_len + 1`` tokens (the model sees ``max_len`` inputs), as lm-eval does."""
    return (list(ctx) + list(cont))[-(max_len + 1):]


def continuation_loglik(token_logprobs: Sequence[float], n_cont: int) -> float:
    """Sum of the last ``n_cont`` per-token log-probabilities of a request."""
    return float(sum(token_logprobs[len(token_logprobs) - n_cont:]))


def accuracy(logliks: Sequence[float], choices: Sequence[str], answer: int) -> tuple[int, int]:
    """(pred, pred_norm): argmax of log-likelihood, and of log-likelihood per UTF-8 byte.

    Ties go to the first choice (numpy's argmax, as lm-eval)."""
    pred = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    per_byte = [ll / len(c.encode("utf-8")) for ll, c in zip(logliks, choices)]
    pred_norm = max(range(len(per_byte)), key=lambda i: (per_byte[i], -i))
    return pred, pred_norm


def build_requests(items: Sequence, encode: Callable[[str], list], eod: int, max_len: int,
                   source: str = "") -> list:
    """Per item, per choice: (token sequence to score, continuation length).

    Runs before any process group: DataError (naming ``source`` and the question) if a
    choice does not fit ``max_len`` tokens or tokenizes to nothing (it cannot be scored).
    """
    requests = []
    for n, item in enumerate(items):
        per_choice = []
        for choice in item.choices:
            ctx, cont = encode_pair(encode, item.context, choice, eod)
            if not 1 <= len(cont) <= max_len:
                what = "is empty after tokenizing" if not cont else \
                    f"has {len(cont)} tokens, more than train.seq_length={max_len}"
                raise DataError(f"{source}: question {n + 1}: a choice {what}; shorten it")
            per_choice.append((request_tokens(ctx, cont, max_len), len(cont)))
        requests.append(per_choice)
    return requests


def score_items(items: Sequence, requests: Sequence, logprobs: Callable[[list], list]) -> dict:
    """Score multiple-choice items with a per-token log-probability function.

    ``requests`` from ``build_requests``. ``logprobs(sequences)`` returns, per token
    sequence s, log p(s[j] | s[:j]) for j = 1..len(s)-1 (the engine's
    ``token_logprobs``, or any hand-made scorer). Returns {"acc", "acc_norm", "items",
    "chance", "per_item"} (the report's ``mc`` entry).
    """
    flat = [r for per_choice in requests for r in per_choice]
    token_lps = logprobs([seq for seq, _ in flat]) if flat else []
    logliks = [continuation_loglik(lp, n_cont) for lp, (_, n_cont) in zip(token_lps, flat)]
    per_item, hits, hits_norm, at = [], 0, 0, 0
    for item in items:
        lls = logliks[at:at + len(item.choices)]
        at += len(item.choices)
        pred, pred_norm = accuracy(lls, item.choices, item.answer)
        hits += pred == item.answer
        hits_norm += pred_norm == item.answer
        entry = {"id": item.id} if item.id is not None else {}
        entry.update(loglik=lls, pred=pred, pred_norm=pred_norm, answer=item.answer)
        per_item.append(entry)
    n = max(len(items), 1)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "items": len(items),
            "chance": sum(1.0 / len(it.choices) for it in items) / n, "per_item": per_item}
