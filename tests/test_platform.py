"""The CPU platform layer (megasmoe/platform/cpu.py): one or more tests per patch P1..P5.

The suite runs on CPU, so ``activate()`` is called in this process (it patches
``torch.cuda.*`` process-wide, which is what every megasmoe process does). Anything
that starts torch.distributed or megatron's parallel_state runs in a subprocess, as do
the checks of an un-patched process and of a process that sees CUDA.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megasmoe import platform
from megasmoe.platform import cpu as P

REPO = Path(__file__).resolve().parents[1]

EXPECTED_PATCHES = (
    "cuda_device_functions",
    "cuda_stream_standins",
    "device_mode",
    "cpu_rng_tracker",
    "alltoall_split_sizes",
    "causal_mask",
    "model_forward_without_mode",
    "rope_cos_sin_cached",
    "linear_without_autograd_function",
)
# P8 acts at import (megasmoe/platform/imports.py), so PATCHES skips its number.
NUMBERS = (1, 2, 3, 4, 5, 6, 7, 9, 10)


@pytest.fixture(scope="module", autouse=True)
def active():
    """The patches, installed once in this (CPU-only) process."""
    assert not torch.cuda.is_available(), "the test suite runs on CPU"
    assert platform.activate() is True
    assert platform.is_active()


def run_script(code: str, timeout: int = 300) -> dict:
    """Run ``code`` in a fresh interpreter at the repo root; it prints one JSON line last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the layer


def test_patches_listed_and_documented():
    assert platform.PATCHES == P.PATCHES == EXPECTED_PATCHES
    documented = re.findall(r"^P(\d+) ``(\w+)``", P.__doc__, flags=re.MULTILINE)
    assert documented == [(str(i), name) for i, name in zip(NUMBERS, EXPECTED_PATCHES)]
    for name in EXPECTED_PATCHES:
        assert name in P.__doc__


def test_activate_is_idempotent():
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import token_dispatcher

    def snapshot():
        return (
            torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream,
            torch.cuda.Event, torch.cuda.current_stream, torch.cuda.stream,
            mrandom._CUDA_RNG_STATE_TRACKER, mrandom._get_cuda_rng_state,
            token_dispatcher.maybe_move_tensor_to_cpu, P._state["mode"],
        )

    before = snapshot()
    depth = torch._C._len_torch_function_stack()
    platform.seed_rng_streams(5, 0, 0, 0)
    states = dict(mrandom.get_cuda_rng_tracker().get_states())
    assert platform.activate() is True
    assert platform.activate() is True
    assert snapshot() == before
    assert torch._C._len_torch_function_stack() == depth  # the mode is entered once
    assert depth >= 1 and isinstance(P._state["mode"], P._CpuDeviceMode)
    # A second activate() must not reset the tracker (its streams survive).
    after = mrandom.get_cuda_rng_tracker().get_states()
    assert set(after) == set(states)
    assert all(torch.equal(after[k], states[k]) for k in states)


def test_device_and_backend_on_cpu():
    assert platform.device() == torch.device("cpu")
    assert platform.backend() == "gloo"


# --------------------------------------------------------------------------- P1


def test_p1_cuda_device_functions():
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.synchronize() is None
    assert torch.cuda.synchronize(0) is None


def test_p1_global_memory_buffer():
    """GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device()."""
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer()
    t = buf.get_tensor((2, 3), torch.float32, "mpu")
    assert t.shape == (2, 3) and t.device.type == "cpu"
    again = buf.get_tensor((3, 2), torch.float32, "mpu")
    assert again.data_ptr() == t.data_ptr()  # the buffer is reused


# --------------------------------------------------------------------------- P2


def test_p2_stream_and_event_standins():
    s = torch.cuda.Stream()
    ev = s.record_event()
    assert ev.synchronize() is None
    assert ev.query() is True
    assert s.query() is True
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.default_stream().synchronize()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    e.wait(s)
    with torch.cuda.stream(s):
        x = torch.ones(3) * 2
    assert x.sum().item() == 6.0
    assert torch.cuda.current_stream().record_event().query() is True


def test_p2_alltoall_dispatcher_side_stream():
    """MoEAlltoAllTokenDispatcher.__init__ builds its side stream from torch.cuda.Stream."""
    from megatron.core.transformer.moe import token_dispatcher

    assert token_dispatcher.torch.cuda.Stream is P._NoOpStream
    assert isinstance(token_dispatcher.torch.cuda.Stream(), P._NoOpStream)


# --------------------------------------------------------------------------- P3


DEVICES = ["cuda", "cuda:0", 0, torch.device("cuda"), torch.device("cuda", 0)]


@pytest.mark.parametrize("device", DEVICES, ids=repr)
def test_p3_factory_functions_land_on_cpu(device):
    made = [
        torch.zeros(2, device=device),
        torch.ones(2, 2, device=device, dtype=torch.bfloat16),
        torch.empty(3, device=device),
        torch.full((2,), 7.0, device=device),
        torch.arange(4, device=device),
        torch.randn(2, device=device),
        torch.tensor([1.0, 2.0], device=device),
        torch.zeros(1).new_zeros(3, device=device),
        torch.empty_like(torch.zeros(2), device=device),
    ]
    for t in made:
        assert t.device.type == "cpu"
    assert made[1].dtype == torch.bfloat16
    assert made[3].tolist() == [7.0, 7.0]


def test_p3_current_device_as_a_device():
    t = torch.zeros(2, device=torch.cuda.current_device())
    assert t.device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES, ids=repr)
def test_p3_tensor_to(device):
    t = torch.arange(3.0)
    assert t.to(device).device.type == "cpu"
    assert t.to(device=device).device.type == "cpu"
    y = t.to(device, torch.float64)
    assert y.device.type == "cpu" and y.dtype == torch.float64
    assert torch.equal(y, t.double())


def test_p3_tensor_to_other_targets_unchanged():
    t = torch.arange(3.0)
    assert t.to(torch.float16).dtype == torch.float16
    assert t.to(torch.zeros(1, dtype=torch.int64)).dtype == torch.int64
    assert t.to("cpu") is t
    assert torch.zeros(2, device="meta").device.type == "meta"


def test_p3_cuda_and_pin_memory_return_the_tensor():
    t = torch.ones(4)
    assert t.cuda() is t
    assert t.cuda(0) is t
    assert t.pin_memory() is t


@pytest.mark.parametrize("dtype, name", [
    (torch.float32, "torch.cuda.FloatTensor"),
    (torch.bfloat16, "torch.cuda.BFloat16Tensor"),
    (torch.float16, "torch.cuda.HalfTensor"),
    (torch.int64, "torch.cuda.LongTensor"),
])
def test_p3_type_answers_cuda_names(dtype, name):
    t = torch.zeros(2, dtype=dtype)
    assert t.type() == name
    p = torch.nn.Parameter(torch.zeros(2, dtype=dtype), requires_grad=dtype.is_floating_point)
    assert p.type() == name


def test_p3_type_conversion_still_converts():
    t = torch.ones(2)
    d = t.type(torch.float64)
    assert d.dtype == torch.float64 and d.device.type == "cpu"


# --------------------------------------------------------------------------- P4


def _tracker():
    from megatron.core.tensor_parallel import random as mrandom

    return mrandom.CpuRNGStatesTracker()


def test_p4_megatron_uses_the_cpu_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    assert type(tracker).__name__ == "CpuRNGStatesTracker"
    assert isinstance(tracker, mrandom.CudaRNGStatesTracker)


def test_p4_fork_is_reproducible_across_trackers():
    a, b = _tracker(), _tracker()
    a.add("s", 7)
    b.add("s", 7)
    with a.fork("s"):
        a1, a2 = torch.rand(5), torch.rand(5)
    with b.fork("s"):
        b1 = torch.rand(5)
    with b.fork("s"):  # the stream continues where the last fork left it
        b2 = torch.rand(5)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    # The stream is torch's CPU generator seeded with the stream's seed.
    ref = torch.Generator().manual_seed(7)
    assert torch.equal(a1, torch.rand(5, generator=ref))


def test_p4_different_names_are_different_streams():
    a = _tracker()
    a.add("x", 11)
    a.add("y", 12)
    with a.fork("x"):
        x = torch.rand(8)
    with a.fork("y"):
        y = torch.rand(8)
    assert not torch.equal(x, y)


def test_p4_fork_restores_the_outer_cpu_state():
    a = _tracker()
    torch.manual_seed(0)
    a.add("s", 3)  # add() must not consume or change the default stream either
    with a.fork("s"):
        torch.rand(100)
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))


def test_p4_fork_restores_state_on_exception():
    a = _tracker()
    a.add("s", 3)
    torch.manual_seed(1)
    with pytest.raises(RuntimeError):
        with a.fork("s"):
            torch.rand(10)
            raise RuntimeError("boom")
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))
    assert a._current_state_name == "default-rng"


def test_p4_nested_forks_keep_each_stream_intact():
    ref, a = _tracker(), _tracker()
    for t in (ref, a):
        t.add("outer", 21)
        t.add("inner", 22)
    with ref.fork("outer"):
        o1, o2 = torch.rand(4), torch.rand(4)
    with ref.fork("inner"):
        i1 = torch.rand(4)
    with a.fork("outer"):
        p1 = torch.rand(4)
        with a.fork("inner"):
            j1 = torch.rand(4)
        p2 = torch.rand(4)
    assert torch.equal(o1, p1) and torch.equal(o2, p2) and torch.equal(i1, j1)


def test_p4_tracker_errors():
    a = _tracker()
    a.add("s", 1)
    with pytest.raises(Exception, match="already exists"):
        a.add("t", 1)
    with pytest.raises(Exception, match="already exists"):
        a.add("s", 2)
    with pytest.raises(Exception, match="not added"):
        with a.fork("nope"):
            pass


def _dropout_masks():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    x = torch.ones(256)
    out = {}
    for name in (mrandom._DATA_PARALLEL_RNG_TRACKER_NAME,
                 mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME,
                 mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME):
        with tracker.fork(name):
            out[name] = F.dropout(x, 0.5, training=True)
    out["default"] = F.dropout(x, 0.5, training=True)
    return out


def test_p4_seed_rng_streams_repeatable_dropout():
    from megatron.core.tensor_parallel import random as mrandom

    platform.seed_rng_streams(1234, tp_rank=0, ep_rank=0, etp_rank=0)
    first = _dropout_masks()
    platform.seed_rng_streams(1234, tp_rank=0, ep_rank=0, etp_rank=0)
    second = _dropout_masks()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    mp, ep = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME
    dp = mrandom._DATA_PARALLEL_RNG_TRACKER_NAME
    assert not torch.equal(first[mp], first[ep])
    assert not torch.equal(first[mp], first[dp])
    # Another tensor-parallel rank: its own model-parallel stream, the same data stream.
    platform.seed_rng_streams(1234, tp_rank=1, ep_rank=0, etp_rank=0)
    tp1 = _dropout_masks()
    assert not torch.equal(tp1[mp], first[mp])
    assert torch.equal(tp1[dp], first[dp]) and torch.equal(tp1[ep], first[ep])
    # Another seed: other masks.
    platform.seed_rng_streams(99, tp_rank=0, ep_rank=0, etp_rank=0)
    assert not torch.equal(_dropout_masks()[dp], first[dp])


def test_p4_seed_rng_streams_uses_megatron_seeds():
    """Same seeds as model_parallel_cuda_manual_seed: CPU and GPU runs share streams."""
    from megatron.core.tensor_parallel import random as mrandom

    seed, tp, ep, etp = 1234, 1, 2, 1
    platform.seed_rng_streams(seed, tp_rank=tp, ep_rank=ep, etp_rank=etp)
    default = torch.rand(4)
    tracker = mrandom.get_cuda_rng_tracker()
    draws = {}
    for name in (mrandom._DATA_PARALLEL_RNG_TRACKER_NAME,
                 mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME,
                 mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME):
        with tracker.fork(name):
            draws[name] = torch.rand(4)
    expect = {
        mrandom._DATA_PARALLEL_RNG_TRACKER_NAME: seed,
        mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + tp,
        mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME: seed + 1024 + 100 * ep + etp,
    }
    for name, s in expect.items():
        assert torch.equal(draws[name], torch.rand(4, generator=torch.Generator().manual_seed(s)))
    assert torch.equal(default, torch.rand(4, generator=torch.Generator().manual_seed(seed)))


def test_p4_cuda_rng_state_functions():
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(5)
    state = mrandom._get_cuda_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    a = torch.rand(3)
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_p4_activation_recompute_replays_dropout():
    """megatron's tensor_parallel.checkpoint restores the RNG streams for the recompute."""
    from megatron.core.tensor_parallel import random as mrandom

    w = torch.linspace(0.5, 1.5, 64)

    def block(x):
        with mrandom.get_cuda_rng_tracker().fork():
            x = F.dropout(x * w, 0.5, training=True)
        return F.dropout(torch.tanh(x), 0.3, training=True) * 3.0

    def grad(recompute: bool):
        platform.seed_rng_streams(77, 0, 0, 0)
        x = torch.linspace(-1.0, 1.0, 64).requires_grad_()
        out = mrandom.checkpoint(block, False, x) if recompute else block(x)
        (out ** 2).sum().backward()
        return out.detach(), x.grad

    out_ref, g_ref = grad(False)
    out_ck, g_ck = grad(True)
    assert torch.equal(out_ref, out_ck)
    assert torch.allclose(g_ref, g_ck, rtol=0, atol=1e-6)
    assert (g_ref == 0).any() and (g_ref != 0).any()  # dropout really dropped something


# --------------------------------------------------------------------------- P5


def test_p5_split_sizes_become_numpy():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    splits = torch.tensor([3, 1, 4])
    out = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 1, 4]
    assert token_dispatcher.maybe_move_tensor_to_cpu(splits) is splits
    assert token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=False,
                                                     record_stream=True) is splits
    assert token_dispatcher.maybe_move_tensor_to_cpu(None, as_numpy=True) is None
    # megatron's own version (still in moe_utils) leaves CPU tensors alone: the patch
    # is what makes the alltoall dispatcher hand ints to all_to_all_single.
    assert token_dispatcher.maybe_move_tensor_to_cpu is not moe_utils.maybe_move_tensor_to_cpu
    assert torch.is_tensor(moe_utils.maybe_move_tensor_to_cpu(splits, as_numpy=True))


# --------------------------------------------------------------------------- subprocesses


ONE_RANK_MEGATRON = """
import copy, json, math, socket, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
from megasmoe import platform
assert platform.activate()
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module
from megasmoe.config import load_config, validate
from megasmoe.model import build_model_chunks, to_transformer_config

s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
parallel_state.initialize_model_parallel()


def build_ddp(cfg, distopt, **optimizer_fields):
    tc = to_transformer_config(cfg)
    module = build_model_chunks(cfg, tc)[0]
    if tc.bf16:
        module = Float16Module(tc, module)
    model = DistributedDataParallel(
        config=tc, module=module,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
            overlap_grad_reduce=False, use_distributed_optimizer=distopt))
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, clip_grad=1.0, bf16=tc.bf16, params_dtype=tc.params_dtype,
        use_distributed_optimizer=distopt, **optimizer_fields), [model])
    return module, model, opt
"""
"""Start of a script: megatron's pieces imported, a one-process gloo group, megatron's
parallel state, and ``build_ddp(cfg, distopt, **optimizer_fields)`` -> (module, DDP model,
megatron optimizer) (shared with tests/test_fused_adam.py)."""

TRAIN_STEP = ONE_RANK_MEGATRON + """
platform.seed_rng_streams(1234, 0, 0, 0)
cfg = validate(load_config("configs/tiny-cpu.yaml", [
    "parallel.world_size=1", "parallel.ep=1", "model.num_layers=2", "model.hidden_size=64",
    "model.vocab_size=256", "moe.num_experts=4", "moe.ffn_hidden_size=64",
    "train.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=2",
    "model.dropout=0.1"]), 1)
tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
pos = torch.arange(16).expand(2, 16)
results = []
for distopt, precision in ((False, "fp32"), (True, "fp32"), (False, "bf16"), (True, "bf16")):
    cfg.train.precision = precision
    module, model, opt = build_ddp(cfg, distopt)
    # Dropout draws from the tracked streams: re-seeded, the same loss; else another.
    losses = []
    for seed in (7, 7, 8):
        platform.seed_rng_streams(seed, 0, 0, 0)
        with torch.no_grad():
            losses.append(model(tokens, pos, None, labels=tokens).float().mean().item())
    # P7: inside the model's forward the device mode is off; around it, on.
    modes = []
    hook = getattr(module, "module", module).decoder.register_forward_pre_hook(
        lambda m, a: modes.append(torch.overrides._get_current_function_mode() is None))
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad_buffer(); opt.zero_grad()
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    model.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    hook.remove()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    inner = getattr(opt, "chained_optimizers", [opt])
    results.append(dict(
        distopt=distopt, precision=precision, ok=bool(ok), grad_norm=float(grad_norm),
        changed=changed, params=len(before), loss=loss.item(), losses=losses,
        optimizers=sorted({type(o).__name__ for o in inner}),
        param_type=next(model.parameters()).type(),
        devices=sorted({p.device.type for p in model.parameters()}),
        grad_devices=sorted({p.main_grad.device.type for p in model.parameters()}),
        mode_off_in_forward=modes,
        mode_on_outside=torch.overrides._get_current_function_mode() is not None))
dist.destroy_process_group()
print(json.dumps(results))
"""


def test_megatron_ddp_and_optimizers_step_on_cpu():
    """P1+P2+P3+P4(+P5 on the dispatch path): megatron DDP, get_megatron_optimizer and one
    step for the fp32, bf16 and distributed optimizers, on a single-process gloo group."""
    runs = run_script(TRAIN_STEP)
    expected = {
        (False, "fp32"): "FP32Optimizer",
        (True, "fp32"): "DistributedOptimizer",
        (False, "bf16"): "Float16OptimizerWithFloat16Params",
        (True, "bf16"): "DistributedOptimizer",
    }
    assert len(runs) == 4
    for r in runs:
        key = (r["distopt"], r["precision"])
        assert r["optimizers"] == [expected[key]], r
        assert r["ok"], r
        assert 0 < r["grad_norm"] < float("inf"), r
        assert r["changed"] == r["params"] > 0, r
        assert 0 < r["loss"] < 20, r
        assert r["devices"] == ["cpu"] and r["grad_devices"] == ["cpu"], r
        assert r["param_type"].startswith("torch.cuda."), r
        a, b, c = r["losses"]
        assert a == b and a != c, r
        assert r["mode_off_in_forward"] == [True], r  # P7
        assert r["mode_on_outside"], r


def test_p7_mode_suspension_is_scoped():
    """device_mode_suspended() pops P3's mode only while it is on top, and restores it."""
    mode = P._state["mode"]
    assert torch.overrides._get_current_function_mode() is mode
    with P.device_mode_suspended():
        assert torch.overrides._get_current_function_mode() is None
        with P.device_mode_suspended():  # nothing of ours on top: a no-op
            assert torch.overrides._get_current_function_mode() is None
    assert torch.overrides._get_current_function_mode() is mode

    class Other(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Other() as other:  # another mode above ours stays, and so does ours
        with P.device_mode_suspended():
            assert torch.overrides._get_current_function_mode() is other
    from megatron.core.models.gpt.gpt_model import GPTModel

    assert hasattr(GPTModel.forward, "__wrapped__")  # P7 installed


def test_p9_rope_is_megatrons_bitwise():
    """P9: cached cos/sin and no empty ``cat`` give megatron's RoPE values exactly, for
    full and partial rotary dimensions, mscale, bf16, a frequencies tensor changed in
    place or replaced; interleaved RoPE goes to megatron's function."""
    from megatron.core.models.common.embeddings import rope_utils

    new = rope_utils._apply_rotary_pos_emb_bshd
    orig = new.__wrapped__
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(16, 2, 4, 96, generator=gen)[..., :32]  # a strided q as from the QKV split
    f = torch.randn(16, 1, 1, 32, generator=gen)
    cases = [(q, f, {}), (q, f, {}), (q, f[..., :16].contiguous(), {}),
             (q, f, {"mscale": 0.5}), (q.bfloat16(), f, {}),
             (q, f, {"rotary_interleaved": True})]
    for t, freqs, kw in cases:
        assert torch.equal(new(t, freqs, **kw), orig(t, freqs, **kw)), kw
    f.mul_(2)  # in place: the cached cos/sin must not be reused
    assert torch.equal(new(q, f), orig(q, f))
    g = torch.randn(16, 1, 1, 32, generator=gen)
    assert torch.equal(new(q, g), orig(q, g))
    with torch.inference_mode():  # no version counter: megatron's function, no cache
        fi, qi = g.clone(), q.clone()
        assert torch.equal(new(qi, fi), orig(qi, fi))
    # Gradients flow to t as through megatron's.
    a, b = q.clone().requires_grad_(), q.clone().requires_grad_()
    (new(a, g) * g).sum().backward()
    (orig(b, g) * g).sum().backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("bias", [False, True])
def test_p10_linear_is_megatrons_bitwise(bias):
    """P10: a linear with nothing for megatron's autograd function to do is torch's
    matmul with torch's autograd: the same output and gradients, bitwise; with any of
    megatron's features asked for, megatron's function runs."""
    from megatron.core.tensor_parallel import layers

    new = layers.linear_with_grad_accumulation_and_async_allreduce
    orig = new.__wrapped__
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 24, generator=gen)
    w = torch.randn(40, 24, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    g = torch.randn(16, 3, 40, generator=gen)
    results = []
    for fn in (new, orig):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        bi = b.clone().requires_grad_() if bias else None
        out = fn(xi, wi, bi, False, False, False)
        (out * g).sum().backward()
        results.append((out.detach(), xi.grad, wi.grad, bi.grad if bias else None,
                        type(out.grad_fn).__name__))
    (o1, x1, w1, b1, fn1), (o2, x2, w2, b2, fn2) = results
    assert torch.equal(o1, o2) and torch.equal(x1, x2) and torch.equal(w1, w2)
    assert not bias or torch.equal(b1, b2)
    assert fn2 == "LinearWithGradAccumulationAndAsyncCommunicationBackward"
    assert fn1 != fn2  # P10 took torch's autograd
    # Any megatron feature in play: megatron's function (its autograd node) runs.
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = new(xi, wi, None, False, False, False, grad_output_buffer=[])
    assert type(out.grad_fn).__name__ == fn2


UNPATCHED = """
import json, warnings
warnings.filterwarnings("ignore")
import numpy as np
import torch
import megasmoe.platform, megasmoe.model  # importing must not patch anything
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer.moe import token_dispatcher

def raises(fn):
    try:
        fn()
    except Exception:
        return True
    return False

out = {
    "active": megasmoe.platform.is_active(),
    "P1 current_device": raises(torch.cuda.current_device),
    "P1 synchronize": raises(torch.cuda.synchronize),
    "P2 Stream": raises(torch.cuda.Stream),
    "P2 Event": raises(torch.cuda.Event),
    "P3 factory": raises(lambda: torch.zeros(1, device="cuda")),
    "P3 Tensor.cuda": raises(lambda: torch.zeros(1).cuda()),
    "P4 tracker.add": raises(lambda: mrandom.get_cuda_rng_tracker().add("x", 1)),
    "type": torch.zeros(1).type(),
    "P5 numpy": isinstance(token_dispatcher.maybe_move_tensor_to_cpu(
        torch.tensor([1, 2]), as_numpy=True), np.ndarray),
}
print(json.dumps(out))
"""


def test_each_patch_is_needed_without_activate():
    """In a fresh process that imports megasmoe but does not activate(), every call site
    the patches answer still fails on CPU (so each patch is needed, and none is implicit)."""
    out = run_script(UNPATCHED)
    assert out.pop("active") is False
    assert out.pop("type") == "torch.FloatTensor"
    assert out.pop("P5 numpy") is False
    assert out == {k: True for k in out}, out


CUDA_PRESENT = """
import json, sys
import torch
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer.moe import moe_utils, token_dispatcher
torch.cuda.is_available = lambda: True
names = ("current_device", "synchronize", "Stream", "Event", "current_stream",
         "default_stream", "stream")
orig = {n: getattr(torch.cuda, n) for n in names}
tracker = mrandom._CUDA_RNG_STATE_TRACKER
get_state = mrandom._get_cuda_rng_state
depth = torch._C._len_torch_function_stack()
from megasmoe import platform
returned = platform.activate()
print(json.dumps({
    "returned": returned,
    "again": platform.activate(),
    "is_active": platform.is_active(),
    "changed": [n for n in names if getattr(torch.cuda, n) is not orig[n]],
    "tracker_same": mrandom._CUDA_RNG_STATE_TRACKER is tracker,
    "get_state_same": mrandom._get_cuda_rng_state is get_state,
    "no_cpu_tracker": not hasattr(mrandom, "CpuRNGStatesTracker"),
    "dispatcher_same": token_dispatcher.maybe_move_tensor_to_cpu
                       is moe_utils.maybe_move_tensor_to_cpu,
    "mode_depth": torch._C._len_torch_function_stack() - depth,
    "linear_unwrapped": not hasattr(__import__(
        "megatron.core.tensor_parallel.layers", fromlist=["x"]
        ).linear_with_grad_accumulation_and_async_allreduce, "__wrapped__"),
    "rope_unwrapped": not hasattr(__import__(
        "megatron.core.models.common.embeddings.rope_utils",
        fromlist=["x"])._apply_rotary_pos_emb_bshd, "__wrapped__"),
    "forward_unwrapped": not hasattr(
        __import__("megatron.core.models.gpt.gpt_model", fromlist=["GPTModel"]).GPTModel.forward,
        "__wrapped__"),
    "type": torch.zeros(1).type(),
    "backend": platform.backend(),
}))
"""


def test_inactive_when_cuda_is_available():
    out = run_script(CUDA_PRESENT)
    assert out["returned"] is False and out["again"] is False
    assert out["is_active"] is False
    assert out["changed"] == []
    assert out["tracker_same"] and out["get_state_same"] and out["no_cpu_tracker"]
    assert out["dispatcher_same"]
    assert out["mode_depth"] == 0
    assert out["forward_unwrapped"]  # P7 not installed
    assert out["rope_unwrapped"]  # P9 not installed
    assert out["linear_unwrapped"]  # P10 not installed
    assert out["type"] == "torch.FloatTensor"
    assert out["backend"] == "nccl"


P8_CPU = """
import json, sys
import megasmoe
light = "torch" not in sys.modules
import megasmoe.training.trainer
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_gelu
from megasmoe.platform import imports
print(json.dumps({
    "light": light,
    "noop": jit.jit_fuser is jit.noop_decorator,
    "flag": imports.jit_fuser_is_off(),
    "plain": not hasattr(fused_bias_gelu.bias_gelu, "_torchdynamo_orig_callable"),
    "dynamo": "torch._dynamo" in sys.modules,
}))
"""

P8_CUDA = """
import json
import torch
torch.cuda.is_available = lambda: True
import megasmoe
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_gelu
from megasmoe.platform import imports
print(json.dumps({
    "compile": jit.jit_fuser is torch.compile,
    "flag": imports.jit_fuser_is_off(),
    "compiled": hasattr(fused_bias_gelu.bias_gelu, "_torchdynamo_orig_callable"),
}))
"""


def test_p8_jit_fuser_is_off_on_cpu_from_import_megasmoe():
    """megatron's fusions stay plain functions, and torch.compile's machinery (dynamo,
    inductor: ~1.5 s of CPU per process) is never imported; ``import megasmoe`` itself
    still imports no torch."""
    out = run_script(P8_CPU)
    assert out == {"light": True, "noop": True, "flag": True, "plain": True,
                   "dynamo": False}, out


def test_p8_inactive_when_cuda_is_available():
    out = run_script(P8_CUDA)
    assert out == {"compile": True, "flag": False, "compiled": True}, out


def test_causal_mask_is_built_on_cpu_outside_the_device_mode():
    """Full recompute rebuilds the attention mask in the backward pass, off P3's mode."""
    from megatron.core.fusions import fused_softmax

    with torch._C.DisableTorchFunction():
        mask = fused_softmax.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert mask.tolist()[0] == [False, True, True, True]
