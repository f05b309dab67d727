"""Run megatron-core on CPU with gloo: every patch in one place.

megatron-core 0.16.1 has no CPU path upstream. It hard-codes CUDA in a handful of
places that a CPU run hits. ``activate()`` installs the small set of measures below,
and only when ``torch.cuda.is_available()`` is False: on a GPU machine nothing here
runs and megatron-core is used exactly as shipped. Each patch is tested in
tests/test_platform.py.

Patches (what each answers in megatron-core 0.16.1):

P1 ``cuda_device_functions``
    ``torch.cuda.current_device`` returns the CPU device and ``torch.cuda.synchronize``
    is a no-op. Answers ~175 call sites, e.g. ``GlobalMemoryBuffer.get_tensor``
    (utils.py), sequence-parallel gathers (tensor_parallel/mappings.py), the router's
    expert-bias buffers (transformer/moe/router.py), dist_checkpointing's async writer.

P2 ``cuda_stream_standins``
    ``torch.cuda.Stream``, ``Event``, ``current_stream``, ``default_stream`` and the
    ``torch.cuda.stream(...)`` context become no-op objects. Answers the alltoall token
    dispatcher, which creates a side stream in ``MoEAlltoAllTokenDispatcher.__init__``
    (transformer/moe/token_dispatcher.py) even when overlap is off.

P3 ``device_mode`` (a ``torch.overrides.TorchFunctionMode``)
    Maps ``device='cuda'`` / ``device=<int>`` to CPU for factory functions and
    ``Tensor.to``; ``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor;
    ``Tensor.type()`` answers ``torch.cuda.<X>Tensor``. Answers the ``device='cuda'``
    literals in optimizer/grad_scaler.py, optimizer/optimizer.py and
    distributed/param_and_grad_buffer.py, and the type-string checks
    (``param.type() == 'torch.cuda.FloatTensor'``) in optimizer/optimizer.py,
    optimizer/distrib_optimizer.py and optimizer/clip_grads.py. A mode is
    thread-local: threads started by megatron-core do not see it (none on our path).

P4 ``cpu_rng_tracker``
    Replaces the CUDA RNG-states tracker (tensor_parallel/random.py:
    ``CudaRNGStatesTracker.add`` calls ``torch.cuda.get_rng_state``; ``fork`` swaps the
    CUDA generator) with one that forks the CPU generator, so the model-parallel,
    expert-parallel and data-parallel RNG streams (dropout, init) work and are
    reproducible; also ``_get_cuda_rng_state``/``_set_cuda_rng_state`` used by
    activation recomputation.

P5 ``alltoall_split_sizes``
    ``maybe_move_tensor_to_cpu`` as imported by transformer/moe/token_dispatcher.py
    converts split-size tensors to numpy only when they are on CUDA; on CPU the
    alltoall dispatcher then hands tensors to ``all_to_all_single``, which takes
    sequences of ints. The replacement converts CPU tensors too when ``as_numpy``.

P6 ``causal_mask``
    ``get_default_causal_mask`` as imported by fusions/fused_softmax.py builds the mask
    with ``device="cuda"``. Under full recompute (``train.recompute``) it runs again in
    the backward pass, where P3's mode is not on the mode stack, and fails; the
    replacement builds it on CPU.

P7 ``model_forward_without_mode``
    ``GPTModel.forward`` (models/gpt/gpt_model.py) runs with P3's mode suspended. The
    mode sees every torch call made from Python, which costs ~0.4 ms per attention and
    ~0.5 ms per MoE layer forward at the default shape (~3% of a training step, measured
    with bench/bench_vs_hf.py), and the forward needs none of it: its device requests
    go through ``torch.cuda.current_device()`` (P1) or the input's device, its one
    CUDA literal is P6's, and megatron's aux-loss tracker allocates on the loss's
    device. The backward pass, the schedule, the optimizer and checkpointing keep the
    mode. (Under full recompute the layers' forward runs again inside the backward,
    with the mode, as before.)

P9 ``rope_cos_sin_cached``
    megatron's unfused RoPE (``_apply_rotary_pos_emb_bshd``, models/common/embeddings/
    rope_utils.py; the path without Transformer Engine) takes cos and sin of the same
    frequencies for q and for k in every layer, and copies its output once more through
    ``cat`` with an empty pass-through part when the rotary dimension is the head size.
    The replacement keeps the last frequencies' cos/sin (same tensor object, version,
    mscale and dtype; recomputed otherwise; never for inference-mode tensors, which have
    no version) and skips the empty ``cat``: the same operations on the same values, so
    the same result bitwise. RoPE's forward at the default CPU shape: 6.4 -> 3.4 ms a
    step (32 calls). Interleaved and multi-latent RoPE go to megatron's function.

P10 ``linear_without_autograd_function``
    megatron's ``linear_with_grad_accumulation_and_async_allreduce`` (tensor_parallel/
    layers.py; every Column/RowParallelLinear without Transformer Engine) runs its own
    autograd function even when it has nothing to add to a plain linear: no gradient
    accumulation fusion, no all-reduce of the input gradient, no sequence-parallel
    gather, no deferred weight gradient. That function's Python costs ~100 us a call on
    CPU (1.5 % of a default training step). In exactly that case the replacement calls
    ``torch.matmul(input, weight.t())`` (plus the bias, added apart as megatron does) with
    torch's own autograd: the same GEMMs forward and backward, the same result bitwise;
    every other case goes to megatron's function.

The eighth measure, P8 ``jit_fuser_off_on_cpu`` (megasmoe/platform/imports.py), is not
in PATCHES: it acts when megatron-core is imported, not at ``activate()``; megatron's
``jit_fuser`` (torch.compile) becomes its no-op decorator on CPU.

Not a patch but part of the same contract (see megasmoe/routers/base.py): the router
computes its logits with ``gating()`` overridden to run in fp32 on the input's device,
because ``Router.gating`` moves the weight to the CUDA device and, without Transformer
Engine, ``router_gating_linear`` raises NameError in 0.16.1 (fixed upstream in 0.17).
psutil is a hard dependency: dist_checkpointing's writer hangs without it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["activate", "is_active", "PATCHES", "device_mode_suspended"]

PATCHES = (
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

_state: dict[str, Any] = {"active": False, "mode": None}


def is_active() -> bool:
    """True once ``activate()`` has installed the CPU patches in this process."""
    return _state["active"]


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int on GPU) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _NoOpStream:
    """Stand-in for torch.cuda.Stream / Event: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def record_event(self, *args, **kwargs) -> "_NoOpStream":
        # Stream.record_event returns an Event the dispatcher later synchronizes on.
        return _NoOpStream()

    def query(self) -> bool:
        return True


class _CpuDeviceMode(TorchFunctionMode):
    """P3: redirect CUDA device requests to CPU and keep CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        elif func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # The optimizer only accepts parameters whose type string is a CUDA type.
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _install_cuda_device_functions() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _install_cuda_stream_standins() -> None:
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """The megatron RNG-states tracker, on torch's CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            outer = self._current_state_name
            if outer != "default-rng":
                self.states_[outer] = saved
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(self.states_[outer] if outer != "default-rng" else saved)
                self._current_state_name = outer

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.CpuRNGStatesTracker = CpuRNGStatesTracker


def _install_alltoall_split_sizes() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _install_causal_mask() -> None:
    from megatron.core.fusions import fused_softmax

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _install_model_forward_without_mode() -> None:
    from megatron.core.models.gpt.gpt_model import GPTModel

    forward = GPTModel.forward

    @functools.wraps(forward)
    def forward_without_device_mode(self, *args, **kwargs):
        with device_mode_suspended():
            return forward(self, *args, **kwargs)

    GPTModel.forward = forward_without_device_mode


def _install_rope_cos_sin_cached() -> None:
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    last: dict[str, tuple] = {}

    @functools.wraps(original)
    def apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False,
                                  multi_latent_attention=False, mscale=1.0):
        # Inference tensors have no version counter to key the cache on.
        if (rotary_interleaved or multi_latent_attention or freqs.requires_grad
                or freqs.is_inference()):
            return original(t, freqs, rotary_interleaved=rotary_interleaved,
                            multi_latent_attention=multi_latent_attention, mscale=mscale)
        key = (freqs._version, float(mscale), t.dtype)
        hit = last.get("entry")
        if hit is None or hit[0] is not freqs or hit[1] != key:
            # megatron's expressions, once per frequencies tensor instead of per call.
            hit = (freqs, key, (torch.cos(freqs) * mscale).to(t.dtype),
                   (torch.sin(freqs) * mscale).to(t.dtype))
            last["entry"] = hit
        cos_, sin_ = hit[2], hit[3]
        rot_dim = freqs.shape[-1]
        if rot_dim == t.shape[-1]:
            return (t * cos_) + (rope_utils._rotate_half(t, False) * sin_)
        rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
        rot = (rot * cos_) + (rope_utils._rotate_half(rot, False) * sin_)
        return torch.cat((rot, t_pass), dim=-1)

    rope_utils._apply_rotary_pos_emb_bshd = apply_rotary_pos_emb_bshd


def _install_linear_without_autograd_function() -> None:
    from megatron.core.tensor_parallel import layers

    original = layers.linear_with_grad_accumulation_and_async_allreduce

    @functools.wraps(original)
    def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
               sequence_parallel, grad_output_buffer=None, wgrad_deferral_limit=0,
               async_grad_allreduce=None, tp_group=None):
        if (gradient_accumulation_fusion or allreduce_dgrad or sequence_parallel
                or grad_output_buffer is not None):
            return original(input, weight, bias, gradient_accumulation_fusion,
                            allreduce_dgrad, sequence_parallel, grad_output_buffer,
                            wgrad_deferral_limit, async_grad_allreduce, tp_group)
        output = torch.matmul(input, weight.t())  # megatron's forward expression
        return output + bias if bias is not None else output

    # megatron reads this attribute off the module-level name to warn once.
    linear.warned = original.warned
    layers.linear_with_grad_accumulation_and_async_allreduce = linear


def activate() -> bool:
    """Install the CPU patches once per process; a no-op (returns False) under CUDA.

    Call it before building megatron-core objects. Idempotent.
    """
    if torch.cuda.is_available():
        return False
    if _state["active"]:
        return True
    _install_cuda_device_functions()
    _install_cuda_stream_standins()
    _install_cpu_rng_tracker()
    _install_alltoall_split_sizes()
    _install_causal_mask()
    _install_model_forward_without_mode()
    _install_rope_cos_sin_cached()
    _install_linear_without_autograd_function()
    mode = _CpuDeviceMode()
    mode.__enter__()  # stays entered for the life of the process (main thread).
    _state.update(active=True, mode=mode)
    return True


def device_mode_suspended() -> contextlib.AbstractContextManager:
    """A context in which P3's device mode is off (a no-op where it is not on top of
    this thread's mode stack: other threads, or another mode entered above it).

    P7 runs the model's forward in it; also for code that never touches megatron-core
    but shares its process, e.g. the plain loop of bench/bench_vs_hf.py.
    """
    mode = _state["mode"]
    if mode is None or torch.overrides._get_current_function_mode() is not mode:
        return contextlib.nullcontext()
    return torch.overrides._pop_mode_temporarily()


def seed_rng_streams(seed: int, tp_rank: int, ep_rank: int, etp_rank: int) -> None:
    """Seed torch and megatron's tracked RNG streams, on CPU or CUDA.

    Same seeds as ``model_parallel_cuda_manual_seed`` (data-parallel: seed; tensor
    parallel: seed + 2718 + tp_rank; expert parallel: seed + 1024 + 100 ep + etp) so a
    CPU and a GPU run draw from the same streams.
    """
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(
            seed, tp_rank=tp_rank, ep_rank=ep_rank, etp_rank=etp_rank
        )
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
