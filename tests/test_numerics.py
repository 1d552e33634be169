"""fp8norm.kernels.numerics.fp8_block: each rule against hand-computed values."""

import pytest
import torch

from fp8norm.kernels.numerics import fp8_block as nx


def test_scale_inv_shape():
    assert nx.scale_inv_shape((1, 1), (128, 128)) == (1, 1)
    assert nx.scale_inv_shape((300, 700), (128, 128)) == (3, 6)
    assert nx.scale_inv_shape((3, 200, 130), (128, 128)) == (3, 2, 2)
    assert nx.scale_inv_shape((256, 4096, 7168), (128, 128)) == (256, 32, 56)


def test_sf_from_amax_floor():
    sf = nx.sf_from_amax(torch.tensor([0.0, 448.0, 1e-6]), 1e-4)
    assert sf.tolist() == pytest.approx([1e-4 / 448, 1.0, 1e-4 / 448])
    assert sf[1].item() == 1.0


@pytest.mark.parametrize("sf,expect", [(1.0, 1.0), (0.75, 1.0), (0.5000001, 1.0), (2.0 ** -20, 2.0 ** -20),
                                       (3.0, 4.0), (1e-4 / 448, 2.0 ** -22)])
def test_ceil_to_ue8m0(sf, expect):
    assert nx.ceil_to_ue8m0(torch.tensor([sf])).item() == expect


def test_ceil_to_ue8m0_just_above_a_power_of_two():
    # log2 would round 2^-10 * (1 + 2^-23) to -10 exactly; the bit rule still rounds up.
    sf = torch.tensor([2.0 ** -10]).view(torch.int32).add(1).view(torch.float32)
    assert nx.ceil_to_ue8m0(sf).item() == 2.0 ** -9


def test_ceil_to_bf16():
    sf = torch.tensor([1.0, 1.00390625, 1.001, 0.3])
    out = nx.ceil_to_bf16(sf)
    assert out.tolist()[:3] == [1.0, 1.0078125, 1.0078125]
    assert out[3].item() >= 0.3 and out[3].item() == out[3].to(torch.bfloat16).float().item()


def test_saturate_e4m3():
    v = torch.tensor([500.0, -1e9, 448.0, 1.0625, 1.1875])
    assert nx.saturate_e4m3(v).float().tolist() == [448.0, -448.0, 448.0, 1.0, 1.25]


def test_is_power_of_two():
    assert nx.is_power_of_two(torch.tensor([1.0, 0.5, 2.0 ** -30]))
    assert not nx.is_power_of_two(torch.tensor([1.0, 0.75]))
    assert not nx.is_power_of_two(torch.tensor([0.0]))


def test_e4m3_grid_step():
    assert nx.e4m3_grid_step(1.0) == 0.125
    assert nx.e4m3_grid_step(300.0) == 32.0
    assert nx.e4m3_grid_step(2.0 ** -8) == 2.0 ** -9
