"""The learning-rate schedule: megatron's OptimizerParamScheduler, built from the config.

The config is the schedule's truth: a resumed run keeps only the step count from its
checkpoint and follows the config's schedule fields from there (``schedule_change`` says
in one line what differs from the checkpoint's).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megasmoe.config import Config, TrainConfig

__all__ = ["SCHEDULE_FIELDS", "build_scheduler", "schedule_change"]


def build_scheduler(optimizer, t: TrainConfig) -> OptimizerParamScheduler:
    """megatron's scheduler for ``optimizer`` over train.steps: warm-up, then cosine,
    linear, constant or WSD decay to train.min_lr; constant weight decay."""
    style = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}
    wsd_steps = t.wsd_decay_steps or max(1, t.steps // 10)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style=style[t.lr_schedule],
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_steps if t.lr_schedule == "wsd" else None,
        lr_wsd_decay_style="linear" if t.lr_schedule == "wsd" else None,
        # The config is the schedule's truth: a resumed run keeps only the step count
        # from its checkpoint, so raising train.steps re-spans the schedule (see
        # Trainer.resume); megatron's default would keep the checkpoint's span silently.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


SCHEDULE_FIELDS = ("steps", "lr", "min_lr", "warmup_steps", "lr_schedule", "wsd_decay_steps")
"""train.* fields that define the LR schedule (a resume follows the config's values)."""


def schedule_change(meta: dict, cfg: Config, lr_now: float) -> Optional[str]:
    """One line saying how the LR schedule differs from the checkpoint's, or None.

    The schedule is a function of the config (re-spanned over the new train.steps from
    the resumed step on), so e.g. a finished cosine run resumed with more steps goes on
    from the value the longer schedule has at that step, not from min_lr.
    """
    saved = meta.get("config", {}).get("train", {})
    changed = [f"train.{k} {saved[k]} -> {getattr(cfg.train, k)}" for k in SCHEDULE_FIELDS
               if k in saved and saved[k] != getattr(cfg.train, k)]
    if not changed:
        return None
    return (f"LR schedule follows the config: {', '.join(changed)}; lr at step "
            f"{meta.get('step')} is now {lr_now:.3g}")
