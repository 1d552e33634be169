"""The dispatcher: Triton for CUDA tensors, the twin for CPU tensors, FP8NORM_BACKEND forces one."""

import pytest
import torch

import fp8norm
import fp8norm.kernels
import fp8norm.reference
from fp8norm import dispatch


@pytest.mark.parametrize("forced,expected", [("", "torch"), ("torch", "torch"), ("triton", "triton"),
                                             (" Triton ", "triton")])
def test_backend_choice_for_cpu_tensors(monkeypatch, forced, expected):
    monkeypatch.setenv("FP8NORM_BACKEND", forced)
    x = torch.randn(130, 140, dtype=torch.bfloat16)
    assert fp8norm.backend_for(x) == expected
    # Whichever backend runs, the public functions give the same bits as the twin.
    q, s = fp8norm.quant_fp8_block(x, scale_fmt="ue8m0")
    q_ref, s_ref = fp8norm.reference.quant_fp8_block(x, scale_fmt="ue8m0")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.equal(fp8norm.dequant_fp8_block(q, s), fp8norm.reference.dequant_fp8_block(q, s))


def test_dispatch_routes_to_the_chosen_module(monkeypatch):
    seen = []
    for name, module in (("triton", fp8norm.kernels), ("torch", fp8norm.reference)):
        monkeypatch.setattr(module, "quant_fp8_block", lambda x, _n=name, **kw: seen.append(_n) or (x, x))
        monkeypatch.setattr(module, "dequant_fp8_block", lambda q, s, _n=name, **kw: seen.append(_n) or q)
    x = torch.zeros(2, 2)
    for forced in ("triton", "torch", ""):
        monkeypatch.setenv("FP8NORM_BACKEND", forced)
        fp8norm.quant_fp8_block(x)
        fp8norm.dequant_fp8_block(x, x)
    assert seen == ["triton", "triton", "torch", "torch", "torch", "torch"]


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FP8NORM_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="FP8NORM_BACKEND"):
        fp8norm.quant_fp8_block(torch.zeros(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_go_to_triton(monkeypatch):
    monkeypatch.delenv("FP8NORM_BACKEND", raising=False)
    x = torch.randn(300, 700, device="cuda", dtype=torch.bfloat16)
    assert dispatch.backend_for(x) == "triton"
    q, s = fp8norm.quant_fp8_block(x)
    q_ref, s_ref = fp8norm.reference.quant_fp8_block(x.cpu())
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)


def test_nvfp4_amax_routes_like_the_others(monkeypatch):
    """nvfp4_amax follows the backend choice too (on CUDA it is the Triton reduction)."""
    x = torch.randn(3, 40, 64, dtype=torch.bfloat16)
    want = x.float().abs().amax((-2, -1))
    for forced in ("triton", "torch"):
        monkeypatch.setenv("FP8NORM_BACKEND", forced)
        assert torch.equal(dispatch.nvfp4_amax(x), want)
    seen = []
    monkeypatch.setattr(fp8norm.kernels, "nvfp4_amax", lambda x, **kw: seen.append("triton") or x)
    monkeypatch.setenv("FP8NORM_BACKEND", "triton")
    dispatch.nvfp4_amax(x)
    assert seen == ["triton"]
