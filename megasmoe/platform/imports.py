"""P8 ``jit_fuser_off_on_cpu``: megatron-core's ``jit_fuser`` is the no-op decorator on CPU.

megatron-core 0.16.1 sets ``megatron.core.jit.jit_fuser = torch.compile`` when the module
is executed, and ~40 functions across megatron (activations, routers, token dispatchers,
norms) are decorated with it as their modules are imported. On CPU that costs every
process ~1.5 s of CPU time at import (``torch.compile`` imports ``torch._dynamo`` and
``torch._inductor.compile_fx``), and a decorated function that is called is compiled by
inductor's C++ backend on first use. The fusions are GPU kernels' reason to exist; on CPU
megatron's own ``disable_jit_fuser()`` (jit_fuser = noop_decorator) is what we want, but
calling it after import is too late: the decorated modules bound ``jit_fuser`` when they
were imported, and importing ``megatron.core.jit`` first imports ``megatron/core/__init__``,
which imports them.

So the measure acts at import: ``install()`` (called by ``import megasmoe``) puts a finder
on ``sys.meta_path`` that, when ``megatron.core.jit`` is executed, sets its ``jit_fuser``
to its own ``noop_decorator`` right after the module body ran and before any other
megatron module can bind it, and only when ``torch.cuda.is_available()`` is False: under
CUDA megatron is left as shipped. megatron imported before megasmoe keeps its compile
decorator (correct, only slower). This module imports neither torch nor megatron, so
``import megasmoe`` stays light (``megasmoe check`` imports neither).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

__all__ = ["JIT_MODULE", "install", "jit_fuser_is_off"]

JIT_MODULE = "megatron.core.jit"
"""The megatron-core module whose ``jit_fuser`` P8 replaces."""

_state = {"off": False}


class _JitFuserFinder(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` with the normal path finder and wraps its loader."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_turn_off(module):
            exec_module(module)
            import torch  # jit.py imported it: free here.

            if not torch.cuda.is_available():
                module.jit_fuser = module.noop_decorator
                _state["off"] = True

        # A per-spec loader wrapper: the shared SourceFileLoader class is not touched.
        spec.loader = _Loader(spec.loader, exec_then_turn_off)
        return spec


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader, with ``exec_module`` replaced."""

    def __init__(self, loader, exec_module):
        self._loader = loader
        self.exec_module = exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def install() -> None:
    """Put P8's finder first on ``sys.meta_path`` once per process (idempotent)."""
    if JIT_MODULE in sys.modules:
        return  # imported before megasmoe: too late to act, leave it as shipped.
    if not any(isinstance(f, _JitFuserFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFuserFinder())


def jit_fuser_is_off() -> bool:
    """True when P8 replaced megatron's ``jit_fuser`` in this process."""
    return _state["off"]
