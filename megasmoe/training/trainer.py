"""The pretraining loop, assembled from megatron-core parts.

DistributedDataParallel, ``get_megatron_optimizer`` (plain or distributed),
``OptimizerParamScheduler``, ``get_forward_backward_func`` (no pipelining, 1F1B or
interleaved 1F1B), ``finalize_model_grads`` and the micro-batch calculator. There is no
global args object: everything comes from one ``Config``. The trainer does not know
which router runs; routers reach it only through megatron's aux-loss tracker and the
telemetry buffers read in ``megasmoe.training.telemetry``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_num_microbatches,
    init_num_microbatches_calculator,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe import moe_utils

from megasmoe import checkpoint as ckpt
from megasmoe import platform
from megasmoe.config import Config, save_config
from megasmoe.model import build_model_chunks, layout_invariant_init, to_transformer_config
from megasmoe.plan import flops_per_token  # noqa: F401  (re-exported)
from megasmoe.training import collapse, heatmap, telemetry
from megasmoe.training.data import batch_iterator, build_datasets
from megasmoe.training.distributed import destroy_distributed, init_distributed, is_main
from megasmoe.training.fused_adam import use_fused_adam
from megasmoe.training.metrics import MetricsWriter, Throughput, truncate_metrics
from megasmoe.training.schedule import build_scheduler, schedule_change
from megasmoe.training.stop import EXIT_REQUEUE, RequeueExit, StopSignal

__all__ = ["Trainer", "pretrain", "RequeueExit", "EXIT_REQUEUE", "flops_per_token"]

def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of token losses, token count, and the pair for reporting (per-token loss mode)."""
    mask = loss_mask.reshape(-1).float()
    loss = (output.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), mask.sum().detach()])
    return loss, num_tokens, {"lm loss": report}


class Trainer:
    """Builds model, optimizer, scheduler and data for one run, then trains it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # Handlers first: a time-limit signal during start-up must not kill the worker;
        # it is honoured at the first step boundary.
        self.stop = StopSignal()
        self.stop.install()
        self.device = platform.device()
        self.tc = to_transformer_config(cfg)
        self.step = 0
        self.consumed_samples = 0
        self._build_model()
        self._build_optimizer()
        self._build_data()
        self.collapse = collapse.Probe(cfg, self.model, self.unwrapped, self.routers,
                                       self.valid_ds, self.device)
        self.ckpt_root = ckpt.checkpoint_root(cfg.run.path)
        self.async_queue = None
        if cfg.checkpoint.enabled and _use_async_save(cfg):
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        self.metrics: MetricsWriter | None = None
        self.resumed: ckpt.Resumed | None = None
        self.schedule_change: str | None = None
        self.log_window: list[float] = []
        """Losses of the steps since the last train/loss log (saved in checkpoints)."""
        self.load_since_eval = None

    # ------------------------------------------------------------------ building

    def _build_model(self) -> None:
        cfg, tc = self.cfg, self.tc
        chunks = build_model_chunks(cfg, tc)
        layout_invariant_init(chunks, cfg.run.seed, cfg.model.init_std, cfg.model.num_layers)
        if torch.cuda.is_available():
            chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
        if tc.bf16:
            chunks = [Float16Module(tc, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.train.distributed_optimizer,
        )
        self.model = [
            DistributedDataParallel(
                config=tc, ddp_config=ddp_config, module=c,
                # Only the first chunk buckets: megatron-LM's rule for interleaving.
                disable_bucketing=i > 0,
            )
            for i, c in enumerate(chunks)
        ]
        self.unwrapped = chunks
        self.routers = telemetry.routers(chunks)

    def _build_optimizer(self) -> None:
        tc, t = self.tc, self.cfg.train
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=tc.bf16,
            params_dtype=tc.params_dtype,
            use_distributed_optimizer=t.distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        use_fused_adam(self.optimizer)  # on CPU, torch's fused kernel (training/fused_adam.py)
        self.scheduler = build_scheduler(self.optimizer, t)
        no_sync = [m.no_sync for m in self.model]
        tc.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        tc.grad_scale_func = self.optimizer.scale_loss
        tc.finalize_model_grads_func = finalize_model_grads
        init_num_microbatches_calculator(
            dist.get_rank(), None, t.global_batch_size, t.micro_batch_size,
            parallel_state.get_data_parallel_world_size(),
        )

    def _build_data(self) -> None:
        self.train_ds, self.valid_ds, self.test_ds = build_datasets(self.cfg)

    def _iterators(self, dataset, consumed: int) -> list:
        """One identical iterator per model chunk (each chunk draws every micro batch)."""
        t = self.cfg.train
        return [
            batch_iterator(dataset, consumed, t.micro_batch_size,
                           parallel_state.get_data_parallel_rank(),
                           parallel_state.get_data_parallel_world_size(),
                           self.cfg.data.num_workers)
            for _ in self.model
        ]

    # ------------------------------------------------------------------ stepping

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])

    def _run_schedule(self, iterators, forward_only: bool) -> list:
        t = self.cfg.train
        fb = get_forward_backward_func()
        return fb(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=get_num_microbatches(),
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )

    def _global_loss(self, losses: list) -> tuple[float, float]:
        """(mean loss per token, tokens) over all micro batches and data-parallel ranks.

        Loss values live on the last pipeline stage; tensor-parallel ranks hold copies,
        so only tp rank 0 contributes. One all-reduce over the world.
        """
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
                parallel_state.get_tensor_model_parallel_rank() == 0:
            for item in losses:
                acc += item["lm loss"].to(acc)
        dist.all_reduce(acc)
        return (acc[0] / acc[1]).item(), acc[1].item()

    def train_step(self) -> dict:
        """One optimizer step over global_batch_size samples; returns its scalars."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        for router in self.routers:
            router.on_train_step(self.step, self.cfg.train.steps)
        losses = self._run_schedule(self._train_iters, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        self.step += 1
        self.consumed_samples += self.cfg.train.global_batch_size
        if ok:
            self.scheduler.step(increment=1)
        loss, tokens = self._global_loss(losses)
        return {"loss": loss, "tokens": tokens, "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"], "skipped": not ok}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and perplexity over eval_iters global batches."""
        t = self.cfg.train
        for m in self.model:
            m.eval()
        total, tokens = 0.0, 0.0
        before = collapse.snapshot(self.routers)
        # The same validation batches every time: comparable across steps and resumes.
        valid_iters = self._iterators(self.valid_ds, 0)
        # Eval must not leak into the training aux-loss and load logs, nor erase them.
        with telemetry.kept(self.unwrapped):
            for _ in range(t.eval_iters):
                losses = self._run_schedule(valid_iters, forward_only=True)
                loss, n = self._global_loss(losses)
                total, tokens = total + loss * n, tokens + n
            probe = self.collapse.measure(before, self.step, self.cfg.run.path, is_main())
        for m in self.model:
            m.train()
        loss = total / max(tokens, 1.0)
        return {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 50.0)), **probe}

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train for train.steps steps with logging and evaluation; returns final scalars."""
        cfg, t = self.cfg, self.cfg.train
        self.resume()
        start = self.step
        if is_main():
            save_config(cfg, cfg.run.path / "config.yaml")
            if self.resumed is not None:
                truncate_metrics(cfg.run.path / "metrics.jsonl", start)
        self.metrics = MetricsWriter(
            cfg.run.path, enabled=is_main(), tensorboard=cfg.logging.tensorboard,
            progress=cfg.logging.progress, total_steps=t.steps,
            purge_step=start + 1 if self.resumed is not None else None,
        )
        if self.resumed is not None:
            r = self.resumed
            self.metrics.info(
                f"megasmoe: resumed from {r.path} at step {r.step} "
                f"({r.consumed_samples} samples consumed"
                f"{'' if r.same_layout else '; new parallel layout, RNG re-seeded'})"
            )
            if self.schedule_change:
                self.metrics.info(f"megasmoe: {self.schedule_change}")
        self._train_iters = self._iterators(self.train_ds, self.consumed_samples)
        for m in self.model:
            m.train()
        tokens_per_step = t.global_batch_size * t.seq_length
        end = min(t.steps, t.exit_at_step) if t.exit_at_step else t.steps
        if self.step >= end:
            self.metrics.info(
                f"megasmoe: {cfg.run.name} is already at step {self.step} of "
                f"train.steps={t.steps}: nothing to train (raise train.steps to continue, or "
                f"set run.name for a new run)")
            self.finish_saves()
            return {"losses": []}
        self.metrics.info(
            f"megasmoe: training {cfg.run.name} for {t.steps} steps "
            f"({tokens_per_step:,} tokens/step) on {dist.get_world_size()} "
            f"{'GPU' if torch.cuda.is_available() else 'CPU'} process(es): "
            f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} ep={cfg.parallel.ep} "
            f"dp={cfg.parallel.dp} router={cfg.moe.router.name}"
        )
        meter = Throughput()
        # train/loss averages the steps since the last log; a checkpoint carries that
        # window (self.log_window), so the first log after a mid-interval resume averages
        # the same steps as an uninterrupted run. The aux-loss tracker and router
        # telemetry are not carried: their first log after a resume covers the steps
        # since the resume (tracked_steps).
        window_losses = self.log_window
        tracked_steps = 0
        last: dict = {}
        history: list[float] = []
        while self.step < end:
            out = self.train_step()
            meter.add(tokens_per_step)
            window_losses.append(out["loss"])
            tracked_steps += 1
            history.append(out["loss"])
            # The last step of train.steps logs its partial window; a stop before it
            # (train.exit_at_step, a signal) leaves the window to the checkpoint instead.
            if self.step % t.log_interval == 0 or self.step == t.steps:
                tps, step_time = meter.read()
                scalars = {
                    "train/loss": sum(window_losses) / len(window_losses),
                    "train/lr": out["lr"],
                    "train/grad_norm": out["grad_norm"],
                    "train/tokens_per_sec": tps,
                    "train/step_time_s": step_time,
                    "train/consumed_samples": self.consumed_samples,
                    "train/mem_gb": _memory_gb(),
                }
                if torch.cuda.is_available():
                    scalars["train/tflops_per_gpu"] = _tflops_per_gpu(cfg, tps)
                scalars.update(self._moe_scalars(tracked_steps))
                self.metrics.log(self.step, scalars)
                self.metrics.print_progress(
                    self.step, scalars["train/loss"], out["lr"], tps, step_time
                )
                window_losses.clear()
                tracked_steps = 0
                last.update(scalars)
            if t.eval_interval and self.step % t.eval_interval == 0 or self.step == end:
                ev = self.evaluate()
                self.metrics.log(self.step, ev)
                self._write_heatmap()
                self.metrics.info(
                    f"  eval step {self.step}: valid loss {ev['valid/loss']:.4f} "
                    f"ppl {ev['valid/ppl']:.2f}"
                )
                last.update(ev)
                meter.read()  # eval time is not training throughput
            if self._stop_requested():
                self.save()
                self.finish_saves()
                self.metrics.info(
                    f"megasmoe: signal {self.stop.received or 'on another rank'}: saved step "
                    f"{self.step}, exiting with code {EXIT_REQUEUE} (requeue)"
                )
                raise RequeueExit()
            c = cfg.checkpoint
            if c.enabled and c.interval and self.step % c.interval == 0 and self.step < end:
                self.save()
            if self.async_queue is not None:
                self.async_queue.maybe_finalize_async_calls(blocking=False)
        if cfg.checkpoint.enabled and self.step > start:
            self.save()
        self.finish_saves()
        last["losses"] = history
        return last

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> None:
        """Load the checkpoint to resume from, if any (checkpoint.resume / resume_step)."""
        c = self.cfg.checkpoint
        if not (c.resume or c.resume_step is not None):
            return
        path = ckpt.find_resume_checkpoint(self.ckpt_root, c.resume_step)
        if path is not None:
            self.resumed = ckpt.load_checkpoint(self, path)
            self.schedule_change = schedule_change(ckpt.read_meta(path), self.cfg,
                                                   self.optimizer.param_groups[0]["lr"])

    def save(self) -> None:
        """Checkpoint the current step (asynchronously on GPU when configured)."""
        c = self.cfg.checkpoint
        ckpt.save_checkpoint(self, self.ckpt_root, keep_last=c.keep_last,
                             keep_every=c.keep_every, async_queue=self.async_queue)

    def finish_saves(self) -> None:
        """Wait for asynchronous saves to be written and published."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    def _stop_requested(self) -> bool:
        """True on every rank if any rank got SIGTERM/SIGUSR1 (one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self.stop.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _aux_loss_names(self) -> list[str]:
        """The tracker's aux-loss names, the same on every pipeline stage, sorted.

        megatron reduces its tracker name by name (an all-reduce over the pipeline group
        each), in the order the names were first logged on that rank. Routers whose
        losses depend on the layer and step (compete's competition losses, simsmoe's CKA
        loss) log different names, or the same in another order, on different stages:
        the stages' collectives would not match (a hang, or one loss summed into
        another). So every stage reduces the union of the names in one order; a name
        this stage never logged enters as zeros.
        """
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        group = parallel_state.get_pipeline_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return sorted(tracker)
        stages: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(stages, sorted(tracker), group=group)
        names = sorted(set().union(*stages))
        for name in names:
            if name not in tracker:
                tracker[name] = {"values": torch.zeros(self.cfg.model.num_layers,
                                                       device=platform.device())}
        return names

    def _moe_scalars(self, steps: int) -> dict:
        """Aux losses per MoE layer from megatron's tracker and router telemetry."""
        moe_utils.reduce_aux_losses_tracker_across_ranks(self._aux_loss_names())
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        scale = 1.0 / (get_num_microbatches() * steps)
        out = {}
        for name, entry in tracker.items():
            values = entry["values"].float() * scale
            for layer in range(values.numel()):
                if values[layer] != 0:
                    out[f"moe/{name}/layer_{layer}"] = values[layer].item()
        moe_utils.clear_aux_losses_tracker()
        scalars, counts = telemetry.collect(self.unwrapped, self.cfg)
        out.update(scalars)
        self.load_since_eval = counts if self.load_since_eval is None else self.load_since_eval + counts
        return out

    def _write_heatmap(self) -> None:
        """Expert-load picture of the tokens routed since the last evaluation (rank 0)."""
        if self.load_since_eval is None:
            return
        if is_main() and self.cfg.logging.heatmaps:
            image = heatmap.load_heatmap(self.load_since_eval.cpu().numpy(), step=self.step)
            heatmap.save_png(image, self.cfg.run.path / "plots" /
                             f"expert_load_step_{self.step:07d}.png")
            self.metrics.image("router/expert_load", image, self.step)
        self.load_since_eval = None

    def close(self) -> None:
        """Close outputs and free megatron's global state."""
        self.stop.restore()
        if self.metrics is not None:
            self.metrics.close()
        if self.async_queue is not None:
            self.async_queue.close()
        destroy_num_microbatches_calculator()


def _use_async_save(cfg: Config) -> bool:
    value = cfg.checkpoint.async_save
    if value == "auto":
        return torch.cuda.is_available()
    return value in (True, "true")


def _memory_gb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _tflops_per_gpu(cfg: Config, tokens_per_sec: float) -> float:
    """Model TFLOP/s per GPU from the global token throughput (see flops_per_token)."""
    return flops_per_token(cfg) * tokens_per_sec / dist.get_world_size() / 1e12


def pretrain(cfg: Config) -> dict:
    """Run one pretraining job in this process (launched by torchrun/srun or alone).

    ``cfg`` must already be validated. Returns the final scalars on every rank. Rank 0
    holds the run directory's lock (``megasmoe.training.lifecycle``) while the job runs;
    a run directory another live job holds is refused with LockError on every rank.
    """
    from megasmoe.training.runlock import hold_run_lock

    init_distributed(cfg)
    try:
        run_lock = hold_run_lock(cfg.run.path)
    except BaseException:
        destroy_distributed()  # without a process group the refusal is printed once
        raise
    try:
        trainer = Trainer(cfg)
        try:
            result = trainer.fit()
            if is_main():
                run_dir = cfg.run.path.resolve()
                saved = ckpt.read_latest(trainer.ckpt_root)
                trainer.metrics.info(
                    f"\nDone. Outputs in {run_dir}\n"
                    f"  config:      {run_dir / 'config.yaml'}\n"
                    f"  metrics:     {run_dir / 'metrics.jsonl'}\n"
                    + (f"  checkpoint:  {saved.resolve()}\n" if saved is not None else "") +
                    f"  TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
                )
            return result
        finally:
            trainer.close()
            destroy_distributed()
    finally:
        run_lock.release()  # after every write of this job (async saves finished in close)
