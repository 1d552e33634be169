"""Every kernel builds for sm_90 (H100) and sm_100 (B200) ahead of time, on this GPU-less machine.

Runs tools/aot_compile.py in a subprocess (triton.compile needs the kernels decorated without the
interpreter) and records registers and spills of each variant in the test report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(REPO / "tools" / "aot_compile.py"), "--json"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_every_kernel_compiles_for_sm90_and_sm100(compiled, record_property):
    by_arch = {}
    for r in compiled:
        by_arch.setdefault(r["arch"], set()).add(r["kernel"])
        record_property(f"{r['kernel']}@sm{r['arch']}",
                        f"regs={r['registers']} spill_stack={r['spill_stack_bytes']} local={r['local_bytes']}")
    assert set(by_arch) == {90, 100}
    assert by_arch[90] == by_arch[100]
    kinds = {k.split("[")[0] for k in by_arch[90]}
    assert kinds == {"quant_fp8_block", "dequant_fp8_block", "quant_nvfp4", "dequant_nvfp4"}
    assert len(by_arch[90]) == 20  # 3 input dtypes x 4 scale modes + 2 FP8-input requant + 3 dequant
    # + NVFP4: quant from bf16 and from FP8, dequant to bf16


def test_no_register_spills(compiled):
    spilled = [(r["kernel"], r["arch"]) for r in compiled if r["spill_stack_bytes"] or r["local_bytes"]]
    assert not spilled
    assert all(0 < r["registers"] <= 255 for r in compiled)


def test_quant_uses_saturating_rne_cast_and_ieee_division(compiled):
    for r in compiled:
        if r["kernel"].startswith("quant"):
            assert r["satfinite_e4m3_cast"], r["kernel"]  # cvt.rn.satfinite.e4m3x2.f32
            assert r["ieee_div"] and not r["approx_div"], r["kernel"]
