"""How fp8norm's kernels are defined and launched: compiled on CUDA tensors, interpreted on CPU tensors.

`@kernel` replaces `@triton.jit`. The decorated object is a real `JITFunction` (the GPU compiles it
as usual, other kernels may call it), and it also carries an interpreted twin of the same Python
function. Each launch picks one from the device of its tensors: CUDA -> compiled, CPU -> the Triton
interpreter. Nothing reads or writes `TRITON_INTERPRET`, so importing fp8norm.kernels changes nothing
for other libraries' Triton kernels.

A kernel may take an `INTERPRET: tl.constexpr` argument, filled in here at launch (never by the
caller): the interpreter's path keeps the software rounding its casts need, the compiled path uses the
hardware casts. A device function called from a kernel takes it as an ordinary constexpr argument.
Kernels may call Triton's own library functions (tl.max, tl.sum, ...) on both paths.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# No FMA contraction: `x * inv` must round on its own, as it does in the torch twin.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}



def as_3d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def launch_group_dequant(kernel_fn, stored: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, *extra,
                         block_m: int, block_n: int, num_warps: int, **constexprs) -> None:
    """Launch a dequant kernel of the grouped formats (int4, MX, NVFP4) over `[M, *]` or `[E, M, *]`:
    one program per (column block, row block, expert), arguments (stored, scale, *extra, out, M, N,
    the strides of stored, scale and out's rows), then BLOCK_M, BLOCK_N and `constexprs`."""
    p3, w3, o3 = as_3d(stored), as_3d(scale), as_3d(out)
    m, n = o3.shape[1], o3.shape[2]
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), p3.shape[0])
    kernel_fn[grid](
        p3, w3, *extra, o3,
        m, n,
        p3.stride(0), p3.stride(1), p3.stride(2),
        w3.stride(0), w3.stride(1), w3.stride(2),
        o3.stride(0), o3.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, **constexprs,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )


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
        compiled = _compile_hook is not None or (device is not None and device.type == "cuda")
        if "INTERPRET" in self.arg_names:
            kwargs = {**kwargs, "INTERPRET": not compiled}
        if _compile_hook is not None:
            return _compile_hook(self, grid, args, kwargs)
        if compiled:
            return JITFunction.run(self, *args, grid=grid, warmup=False, **kwargs)
        with _interpretable_triton_stdlib():
            return self.interpreted.run(*args, grid=grid, warmup=False, **kwargs)


_stdlib_lock = threading.RLock()
_interpreted_stdlib: dict = {}


@contextlib.contextmanager
def _interpretable_triton_stdlib() -> Iterator[None]:
    """Triton's own `@triton.jit` helpers (tl.max, tl.sum, tl.cdiv, ...) were decorated as compiled
    functions when triton was imported, and the interpreter cannot call those. For the duration of an
    interpreted launch they are replaced by interpreted twins, then put back: the same kind of
    temporary patch the interpreter itself applies to `tl`'s builtins while a kernel runs. The twins
    are DualKernels: still JITFunctions for any code that checks (triton imports more lazily)."""
    with _stdlib_lock:
        saved = [(mod, name, obj) for mod in (tl, tl.standard) for name, obj in vars(mod).items()
                 if type(obj) is JITFunction]
        for mod, name, obj in saved:
            if obj not in _interpreted_stdlib:
                _interpreted_stdlib[obj] = DualKernel(obj.fn)
            setattr(mod, name, _interpreted_stdlib[obj])
        try:
            yield
        finally:
            for mod, name, obj in saved:
                setattr(mod, name, obj)


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
