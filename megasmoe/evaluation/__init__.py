"""Evaluation: ``megasmoe eval`` (perplexity per dataset, multiple-choice accuracy).

One module per concern: sources (reading and checking the inputs), mc (multiple-choice
scoring, pure functions), engine (the forward-only model at any layout), report (JSON,
console table, TensorBoard), cli (the command). docs/evaluation.md has the whole story.
"""

from megasmoe.evaluation.cli import add_subcommand

__all__ = ["add_subcommand"]
