"""fp8norm's Triton kernels, imported as `fp8norm.kernels` (never as a top-level `kernels`).

Each kernel has a pure-torch twin with the same signature in `fp8norm.reference`. A launch on CUDA
tensors runs the compiled kernel; a launch on CPU tensors runs the same kernel under the Triton
interpreter (slow: for tests). The choice is made per launch (see `_launch`): importing this package
sets no environment variable and leaves other libraries' `@triton.jit` kernels alone.

This package holds the kernels and their launch wrappers only. What the tools run them on lives
with the tools: tools/kernel_cases.py lists, per kernel module (`kernel_modules()`: every module here
whose name has no leading underscore), the calls tools/aot_compile.py compiles, and a module with none
is an error there; tools/gpu_check.py's `OPS` compare and time each public wrapper against its twin on
a GPU node (one not covered is listed as uncovered). Kernels are decorated with `_launch.kernel` (not
`triton.jit`) and take an `INTERPRET` constexpr that the launch fills in.
"""



def _hand_over_the_name() -> None:
    """This folder imported as the top-level `kernels`: only because a checkout root is on sys.path
    (`python -m pytest`, `python -m fp8norm`, `torchrun -m fp8norm` started from it). That name
    belongs to Hugging Face's `kernels`, which transformers imports: put the installed package of
    that name in our place (the import system returns whatever sys.modules holds once this module
    has run), or fail exactly as if the name did not exist."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.realpath(__file__)
    root = os.path.dirname(os.path.dirname(here))
    others = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, others)
    if spec is None or os.path.realpath(spec.origin or "") == here:
        raise ModuleNotFoundError(f"No module named {__name__!r} ({os.path.dirname(__file__)} is "
                                  "fp8norm.kernels, not a top-level package)", name=__name__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[__name__]
        raise


if __name__ != "fp8norm.kernels":
    _hand_over_the_name()
else:
    try:
        import triton  # noqa: F401
    except ImportError:  # no Triton here (it ships for Linux): the rules in .numerics and the twins still work
        pass
    else:
        from ._launch import capture_compiles, kernel
        from .dequant_fp8_block import dequant_fp8_block, dequant_fp8_block_kernel
        from .quant_fp8_block import quant_fp8_block, quant_fp8_block_kernel
        from .quant_nvfp4 import (dequant_nvfp4, dequant_nvfp4_kernel, nvfp4_amax, nvfp4_amax_kernel, quant_nvfp4,
                                  quant_nvfp4_kernel)
        from .quant_fp8_channel import dequant_fp8_channel, quant_fp8_channel
        from .quant_mx import dequant_mx, quant_mx
        from .quant_int4 import dequant_int4, quant_int4

__all__ = ["quant_fp8_block", "dequant_fp8_block", "quant_fp8_block_kernel", "dequant_fp8_block_kernel",
           "quant_nvfp4", "dequant_nvfp4", "nvfp4_amax", "quant_nvfp4_kernel", "dequant_nvfp4_kernel",
           "nvfp4_amax_kernel", "capture_compiles", "kernel", "kernel_modules",
           "quant_fp8_channel", "dequant_fp8_channel", "quant_mx", "dequant_mx",
           "quant_int4", "dequant_int4"]


def kernel_modules() -> list:
    """The public kernel modules of this package (no leading underscore), imported, sorted by name."""
    import importlib
    import pkgutil

    return [importlib.import_module(f"{__name__}.{m.name}")
            for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
            if not m.name.startswith("_") and not m.ispkg]  # numerics/: the rules, not kernels
