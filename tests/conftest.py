"""Shared fixtures. Kernel tests run every case on both backends: the Triton kernel (under the
interpreter on CPU, on the GPU where CUDA is present) and its torch twin."""

import os

import pytest
import torch

import fp8norm.kernels
import fp8norm.reference

BACKENDS = {
    "triton": (fp8norm.kernels, "cuda" if torch.cuda.is_available() else "cpu"),
    "torch": (fp8norm.reference, "cpu"),
}


class Backend:
    """A kernel implementation and the device its inputs go to; results come back on the CPU."""

    def __init__(self, name):
        self.name = name
        self.impl, self.device = BACKENDS[name]

    def quant(self, x, **kw):
        for key in ("scale_inv", "x_scale_inv"):
            if kw.get(key) is not None:
                kw[key] = kw[key].to(self.device)
        q, s = self.impl.quant_fp8_block(x.to(self.device), **kw)
        return q.cpu(), s.cpu()

    def dequant(self, q, s, **kw):
        return self.impl.dequant_fp8_block(q.to(self.device), s.to(self.device), **kw).cpu()


@pytest.fixture(params=list(BACKENDS), ids=list(BACKENDS))
def backend(request):
    return Backend(request.param)


@pytest.fixture
def fsyncs(monkeypatch):
    """The paths os.fsync is called on, in order (what each descriptor names at that moment)."""
    real, seen = os.fsync, []

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen
