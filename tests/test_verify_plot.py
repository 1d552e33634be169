"""`fp8norm verify --plot`: points at their layers and no lines between them, the bands shaded from the
report's bands, the floor of the report's format, the y range zoomed to the data, the worst tensors
named, the PNG written, and the missing-matplotlib error before any work."""

import math
import sys

import pytest

from fp8norm import formats
from fp8norm.checks import Bands, TensorCheck, worst
from fp8norm.verify import VerifyReport
from fp8norm.verify_plot import PLOT_NEEDS_MATPLOTLIB, WORST_ANNOTATED, plot_report, require_matplotlib, sqnr_figure

pytest.importorskip("matplotlib")

PLOT_ERROR = "--plot needs matplotlib: pip install 'fp8norm[plot]' (or pip install matplotlib)"


def check(name: str, sqnr_db: float, bands: Bands) -> TensorCheck:
    """A TensorCheck with only what the plot reads: the name, the SQNR and its verdict."""
    rel = 10 ** (-sqnr_db / 20)
    c = TensorCheck(name, "model.safetensors", 1 - rel ** 2 / 2, rel, sqnr_db, 0.1, 0.0, 0.0, 0.0, 0.0, 1024, 0,
                    None, {}, "")
    c.bands = bands.judge(c)
    c.status = worst(*c.bands.values())
    return c


def report_of(sqnr_by_name: dict[str, float], bands: Bands | None = None, scheme: str = "fp8-block") -> VerifyReport:
    bands = bands or Bands()
    return VerifyReport(checks=[check(n, db, bands) for n, db in sqnr_by_name.items()], bands=bands, scheme=scheme)


def example_like(bands: Bands | None = None) -> VerifyReport:
    """Three layers (one an MTP stack), kinds present in some layers only, two experts of one kind."""
    return report_of({"model.layers.0.self_attn.q_proj.weight": 31.8,
                      "model.layers.0.mlp.experts.0.up_proj.weight": 31.0,
                      "model.layers.0.mlp.experts.1.up_proj.weight": 32.0,
                      "model.layers.1.self_attn.q_proj.weight": 31.5,
                      "model.layers.1.self_attn.k_proj.weight": 31.6,
                      "mtp.layers.0.self_attn.q_proj.weight": 31.7}, bands)


def band_patch_y(ax, label_start: str) -> tuple[float, float]:
    """(bottom, top) in dB of the shaded band whose legend label starts with label_start."""
    [patch] = [p for p in ax.patches if p.get_label().startswith(label_start)]
    ys = patch.get_patch_transform().transform(patch.get_path().vertices)[:, 1]
    return float(ys.min()), float(ys.max())


def test_points_sit_at_their_layer_with_no_line_between_them():
    fig = sqnr_figure(example_like())
    ax = fig.axes[0]
    # the only line is the floor, horizontal: nothing joins points of different layers
    assert [line.get_label() for line in ax.lines] == ["e4m3 floor 31.5 dB (fp8-block)"]
    assert len(set(ax.lines[0].get_ydata())) == 1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "mtp.0"]
    points = {c.get_label(): [tuple(xy) for xy in c.get_offsets()] for c in ax.collections
              if not c.get_label().startswith("_")}
    assert sorted(points) == ["mlp.experts.up_proj", "self_attn.k_proj", "self_attn.q_proj"]
    # kinds side by side (sorted: up_proj, k_proj, q_proj), each at one offset in every layer; 0.8 / 3 apart
    q = points["self_attn.q_proj"]
    assert [x for x, _ in q] == pytest.approx([0 + 0.8 / 3, 1 + 0.8 / 3, 2 + 0.8 / 3])
    assert [y for _, y in q] == [31.8, 31.5, 31.7]
    assert points["self_attn.k_proj"] == [(pytest.approx(1.0), 31.6)]
    # the two experts of layer 0 stacked at one x
    assert points["mlp.experts.up_proj"] == [(pytest.approx(-0.8 / 3), 31.0), (pytest.approx(-0.8 / 3), 32.0)]


def test_bands_are_shaded_from_the_reports_bands():
    bands = Bands(sqnr_good=28.0, sqnr_warn=18.0)
    report = report_of({"model.layers.0.self_attn.q_proj.weight": 31.0,
                        "model.layers.1.self_attn.q_proj.weight": 24.0,  # WARN
                        "model.layers.2.self_attn.q_proj.weight": 12.0}, bands)  # FAIL
    ax = sqnr_figure(report).axes[0]
    lo, hi = ax.get_ylim()
    good, warn, fail = band_patch_y(ax, "GOOD"), band_patch_y(ax, "WARN"), band_patch_y(ax, "FAIL")
    assert warn == (18.0, 28.0)
    assert good[0] == 28.0 and good[1] >= hi
    assert fail[1] == 18.0 and fail[0] <= lo
    labels = [p.get_label() for p in ax.patches]
    assert labels == ["GOOD \u2265 28 dB", "WARN 18\u201328 dB", "FAIL < 18 dB"]
    # each band named beside the axis where it shows
    assert {t.get_text() for t in ax.texts} >= {"GOOD", "WARN", "FAIL"}


def test_y_range_is_the_data_the_floor_and_the_nearest_band_edge():
    ax = sqnr_figure(example_like()).axes[0]
    # data 31.0-32.0, floor 31.54, GOOD edge 29.5 below: 29.5-32.0 (span 2.5), + 8% above, - 12% below
    assert ax.get_ylim() == pytest.approx((29.2, 32.2))
    # all below the band edges: the view reaches the floor, and the worst tensor sits 30% above the bottom
    # to leave room for the names: top 31.54 + 0.08 * 26.54, bottom (5 - 0.3 * top) / 0.7
    floor = -20 * math.log10(0.0265)
    report = report_of({"model.layers.0.self_attn.q_proj.weight": 5.0, "model.layers.1.self_attn.q_proj.weight": 6.0})
    top = floor + 0.08 * (floor - 5.0)
    assert sqnr_figure(report).axes[0].get_ylim() == pytest.approx(((5.0 - 0.3 * top) / 0.7, top))


def test_floor_line_and_title_are_the_reports_format():
    ax = sqnr_figure(example_like()).axes[0]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([31.535, 31.535], abs=1e-3)  # -20 log10(0.0265)
    mx4 = report_of({"model.layers.0.self_attn.q_proj.weight": 15.6}, Bands.for_format(formats.get("mxfp4"), "max"),
                    scheme="mxfp4")
    ax = sqnr_figure(mx4).axes[0]
    [floor] = ax.lines
    assert floor.get_label() == "e2m1 floor 18.9 dB (mxfp4)"
    assert list(floor.get_ydata()) == pytest.approx([18.862, 18.862], abs=1e-3)  # -20 log10(0.114)
    assert ax.get_title().startswith("mxfp4 (e2m1) quantization error per tensor: 1 tensors")
    assert "FP8" not in ax.get_title()
    assert band_patch_y(ax, "WARN") == (6.5, 13.9)


def test_the_worst_tensors_are_ringed_and_named():
    sqnr = {f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight": 31.0 + 0.1 * layer + 0.01 * e
            for layer in range(4) for e in range(3)}
    sqnr["model.layers.2.mlp.experts.1.up_proj.weight"] = 12.0  # the worst, FAIL
    sqnr["model.layers.3.mlp.experts.0.up_proj.weight"] = 24.5  # the second, WARN
    ax = sqnr_figure(report_of(sqnr)).axes[0]
    [names] = [t.get_text() for t in ax.texts if t.get_text().startswith("1. ")]
    assert names.split("\n") == ["1. model.layers.2.mlp.experts.1.up_proj.weight  12.00 dB (FAIL)",
                                 "2. model.layers.3.mlp.experts.0.up_proj.weight  24.50 dB (WARN)",
                                 "3. model.layers.0.mlp.experts.0.up_proj.weight  31.00 dB (GOOD)",
                                 "4. model.layers.0.mlp.experts.1.up_proj.weight  31.01 dB (GOOD)"]
    assert WORST_ANNOTATED == 4
    # rank numbers point at the tensors (one kind: offset 0, x = layer), rings around the same points
    ranks = {a.get_text(): a.xy for a in ax.texts if a.get_text().isdigit()}
    assert ranks == {"1": (2, 12.0), "2": (3, 24.5), "3": (0, 31.0), "4": (0, 31.01)}
    [rings] = [c for c in ax.collections if c.get_label().startswith("_")]
    assert [tuple(xy) for xy in rings.get_offsets()] == [(2, 12.0), (3, 24.5), (0, 31.0), (0, 31.01)]


def test_infinite_sqnr_is_drawn_on_the_edge_of_its_band():
    report = example_like()
    report.checks.append(check("model.embed_tokens.weight", math.inf, report.bands))  # exact
    report.checks.append(check("lm_head.weight", -math.inf, report.bands))  # a zero source stored nonzero
    ax = sqnr_figure(report).axes[0]
    lo, hi = ax.get_ylim()
    [(_, top)] = [c.get_offsets()[0] for c in ax.collections if c.get_label() == "model.embed_tokens"]
    [(_, bottom)] = [c.get_offsets()[0] for c in ax.collections if c.get_label() == "lm_head"]
    assert (top, bottom) == (hi, lo) and lo < 20.0  # the bottom edge in the FAIL band
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "other"


def test_plot_report_writes_the_png(tmp_path):
    from matplotlib.image import imread

    path = plot_report(example_like(), tmp_path / "r.png")
    assert path == tmp_path / "r.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert imread(path).shape[:2] == (560, 1000)  # 10 x 5.6 in at 100 dpi


def test_without_matplotlib_the_one_line_error_comes_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert PLOT_NEEDS_MATPLOTLIB == PLOT_ERROR
    with pytest.raises(ValueError) as e:
        require_matplotlib()
    assert str(e.value) == PLOT_ERROR
    # the report is not read (an object without checks would raise AttributeError) and no file is made
    with pytest.raises(ValueError) as e:
        plot_report(object(), tmp_path / "r.png")
    assert str(e.value) == PLOT_ERROR and not (tmp_path / "r.png").exists()


def test_verify_plot_without_matplotlib_fails_before_any_work(monkeypatch, tmp_path):
    """`fp8norm verify --plot` without matplotlib: the one-line error comes before the report is computed."""
    import sys
    from unittest import mock

    from click.testing import CliRunner

    from fp8norm.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with mock.patch("fp8norm.verify.verify") as verify:
        res = CliRunner().invoke(main, ["verify", str(tmp_path), str(tmp_path), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 1 and "pip install 'fp8norm[plot]'" in res.output, res.output
    assert not verify.called and not (tmp_path / "p.png").exists()
