"""How fp8norm's kernels are defined and launched: compiled on CUDA tensors, interpreted on CPU tensors.

`@kernel` replaces `@triton.jit`. The decorated object is a real `JITFunction` (the GPU compiles it
as usual, other kernels may call it), and it also carries an interpreted twin of the same Python
function. Each launch picks one from the device of its tensors: CUDA -> compiled, CPU -> the Triton
interpreter. Nothing reads or writes `TRITON_INTERPRET`, so importing fp8norm.kernels changes nothing
for other libraries' Triton kernels.

Every kernel takes an `INTERPRET: tl.constexpr` argument, filled in here at launch (never by the
caller): the interpreter's path keeps the software rounding its casts need, the compiled path uses the
hardware casts. A device function called from a kernel takes it as an ordinary constexpr argument.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from triton.runtime.jit import JITFunction

# No FMA contraction: `x * inv` must round on its own, as it does in the torch twin.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

# Set by `capture_compiles`: called instead of launching on the GPU (ahead-of-time compilation).
_compile_hook: Callable | None = None


class DualKernel(JITFunction):
    """A JITFunction that runs under the Triton interpreter when its launch gets CPU tensors."""

    def __init__(self, fn):
        super().__init__(fn)
        self._interpreted = None

    @property
    def interpreted(self):
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction  # imports numpy: only when needed

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def __call__(self, *args, **kwargs):
        # Only reached as a device-function call inside an interpreted kernel (compiled kernels
        # inline JITFunctions without calling them).
        return self.interpreted(*args, **kwargs)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if _compile_hook is not None:
            return _compile_hook(self, grid, args, {**kwargs, "INTERPRET": False})
        if device is not None and device.type == "cuda":
            return JITFunction.run(self, *args, grid=grid, warmup=False, **kwargs, INTERPRET=False)
        return self.interpreted.run(*args, grid=grid, warmup=False, **kwargs, INTERPRET=True)


def kernel(fn) -> DualKernel:
    """Decorator for fp8norm's kernels and their device functions (instead of `triton.jit`)."""
    return DualKernel(fn)


@contextlib.contextmanager
def capture_compiles(hook: Callable) -> Iterator[None]:
    """Within the block, every kernel launch calls `hook(jit_function, grid, args, kwargs)` instead.

    For tools/aot_compile.py: the public wrappers run on CPU tensors as usual (checks, allocation,
    grid, constexprs) and the hook compiles what a CUDA launch would, for any target. The wrappers'
    outputs are then uninitialized memory, and their after-launch checks may raise.
    """
    global _compile_hook
    previous, _compile_hook = _compile_hook, hook
    try:
        yield
    finally:
        _compile_hook = previous
