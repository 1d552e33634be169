"""fp8norm: low-precision (FP8 block-scaled) checkpoints of large language models.

    >>> import torch, fp8norm
    >>> q, scale_inv = fp8norm.quant_fp8_block(torch.randn(300, 700, dtype=torch.bfloat16))
    >>> w = fp8norm.dequant_fp8_block(q, scale_inv)

Kernels: `fp8norm.kernels` (Triton); their torch twins: `fp8norm.reference`.
"""

__version__ = "0.1.0"
__all__ = ["quant_fp8_block", "dequant_fp8_block", "backend_for", "__version__"]


def __getattr__(name: str):
    # The dispatchers import torch (seconds): loaded on first use, so `fp8norm --help` / `--version`
    # and `import fp8norm` stay fast.
    if name in ("quant_fp8_block", "dequant_fp8_block", "backend_for"):
        from . import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module 'fp8norm' has no attribute {name!r}")
