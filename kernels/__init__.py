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

import sys  # noqa: E402
import types  # noqa: E402

# The public names, each from its module, imported on first use (PEP 562): importing this package, or
# its triton-free `numerics` (which verify, the twins and every command import), costs no Triton
# import (0.3 s of every command's start on CPU, where the torch twins run instead). Without Triton
# (it ships for Linux) the names are missing, as before; .numerics and the twins still work.
_EXPORTS = {
    "capture_compiles": "_launch", "kernel": "_launch",
    "dequant_fp8_block": "dequant_fp8_block", "dequant_fp8_block_kernel": "dequant_fp8_block",
    "quant_fp8_block": "quant_fp8_block", "quant_fp8_block_kernel": "quant_fp8_block",
    "dequant_nvfp4": "quant_nvfp4", "dequant_nvfp4_kernel": "quant_nvfp4", "nvfp4_amax": "quant_nvfp4",
    "nvfp4_amax_kernel": "quant_nvfp4", "quant_nvfp4": "quant_nvfp4", "quant_nvfp4_kernel": "quant_nvfp4",
    "dequant_fp8_channel": "quant_fp8_channel", "quant_fp8_channel": "quant_fp8_channel",
    "dequant_mx": "quant_mx", "quant_mx": "quant_mx",
    "dequant_int4": "quant_int4", "quant_int4": "quant_int4",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    try:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as e:
        if e.name != "triton" and not (e.name or "").startswith("triton."):
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (Triton is not installed)") from None
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing a submodule sets it as an attribute of this package; where it shares a public
        # function's name (quant_fp8_block, quant_mx, ...) the name stays the function's, as it was
        # when this package imported them all at once.
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


if __name__ == "fp8norm.kernels":  # (as the top-level `kernels`, sys.modules holds Hugging Face's package now)
    sys.modules[__name__].__class__ = _Package


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
