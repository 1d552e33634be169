"""`fp8norm shard` / `unshard` on the compressed-tensors schemes `quantize --scheme` writes (fp8-channel,
mxfp8, mxfp4): every rank tensor equals the source cut by hand (weight rows/columns, mxfp4 bytes at
column/2, scale rows, MX scale columns at /32, per-channel scales whole on row-parallel ranks), the
twins dequantize a rank's piece to the same piece of the dequantized source, HF -> MCore -> HF is
byte-identical, and a column split off the 32-column MX grid is refused in one line before DST exists."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8norm import reference
from fp8norm.examples import make_example
from fp8norm.shard.mcore import rank_file
from tests.ckpt_utils import cli, one_line_error, read_dir, same_bytes, tree_bytes
from tests.test_shard_mcore import make_ckpt

SCHEMES = ["fp8-channel", "mxfp8", "mxfp4"]
# the qwen3-moe example: 2 layers, 16 q heads / 8 kv heads of 128, hidden 256, 4 experts
LAYERS, GROUPS, HEAD_DIM, Q_PER_GROUP, EXPERTS = 2, 8, 128, 2, 4
LAYOUTS = {"deepseek-mp2": ["--layout", "deepseek", "--mp", "2"], "mcore-tp2": ["--layout", "mcore", "--tp", "2"],
           "mcore-tp2-ep2": ["--layout", "mcore", "--tp", "2", "--ep", "2"],
           "mcore-pp2": ["--layout", "mcore", "--pp", "2"]}


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("shard_schemes") / "bf16", "qwen3-moe", "sharded")


@pytest.fixture(scope="module")
def runs(bf16, tmp_path_factory):
    """{(scheme, layout): DST}, each quantized / sharded once per module, on first use."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def get(scheme, layout=None):
        if (scheme, layout) not in done:
            dst = root / f"{scheme}-{layout}"
            if layout is None:
                cli("quantize", bf16, dst, "--to", scheme, "--skip-verify")
            else:
                cli("shard", get(scheme), dst, *LAYOUTS[layout])
            done[scheme, layout] = dst
        return done[scheme, layout]
    return get


def piece(hf: dict, scheme: str, name: str, axis: int = 0, lo: int = 0, hi: int | None = None) -> dict:
    """Rows (axis 0) or logical columns (axis 1) [lo, hi) of the HF weight `name`, as stored, cut by hand:
    {storage suffix: tensor}. Plain tensors: just the tensor."""
    packed = name + "_packed" in hf
    w = hf[name + "_packed" if packed else name]
    if hi is None:
        hi = w.shape[axis] * (2 if packed and axis == 1 else 1)
    step = 2 if packed and axis == 1 else 1  # mxfp4: two e2m1 codes a byte along K
    out = {"_packed" if packed else "": w.narrow(axis, lo // step, (hi - lo) // step)}
    if name + "_scale" in hf:
        s = hf[name + "_scale"]
        if scheme == "fp8-channel":
            out["_scale"] = s[lo:hi] if axis == 0 else s  # one scale per row: a column cut keeps all of them
        else:
            out["_scale"] = s[lo:hi] if axis == 0 else s[:, lo // 32:hi // 32]
    return out


def rows(*pieces: dict) -> dict:
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


def expected_mcore(hf, scheme, tp, pp, ep, t, s, e) -> dict:
    out = {}

    def put(mc, parts):
        out.update({mc + k: v for k, v in parts.items()})

    def split_rows(name):
        n = hf[name].shape[0]
        return piece(hf, scheme, name, 0, t * n // tp, (t + 1) * n // tp)
    per_stage, per_rank = LAYERS // pp, EXPERTS // ep
    if s == 0:
        put("embedding.word_embeddings.weight", split_rows("model.embed_tokens.weight"))
    for j in range(per_stage):
        h, m = f"model.layers.{s * per_stage + j}", f"decoder.layers.{j}"
        att, gpr = f"{m}.self_attention", GROUPS // tp
        put(f"{att}.linear_qkv.layer_norm_weight", {"": hf[f"{h}.input_layernorm.weight"]})
        qkv = []
        for g in range(t * gpr, (t + 1) * gpr):  # per query group: its q heads, then k, then v
            qn = Q_PER_GROUP * HEAD_DIM
            qkv += [piece(hf, scheme, f"{h}.self_attn.q_proj.weight", 0, g * qn, (g + 1) * qn)]
            qkv += [piece(hf, scheme, f"{h}.self_attn.{x}_proj.weight", 0, g * HEAD_DIM, (g + 1) * HEAD_DIM)
                    for x in "kv"]
        put(f"{att}.linear_qkv.weight", rows(*qkv))
        put(f"{att}.q_layernorm.weight", {"": hf[f"{h}.self_attn.q_norm.weight"]})
        put(f"{att}.k_layernorm.weight", {"": hf[f"{h}.self_attn.k_norm.weight"]})
        k = GROUPS * Q_PER_GROUP * HEAD_DIM
        put(f"{att}.linear_proj.weight",
            piece(hf, scheme, f"{h}.self_attn.o_proj.weight", 1, t * k // tp, (t + 1) * k // tp))
        put(f"{m}.pre_mlp_layernorm.weight", {"": hf[f"{h}.post_attention_layernorm.weight"]})
        put(f"{m}.mlp.router.weight", {"": hf[f"{h}.mlp.gate.weight"]})
        for local in range(per_rank):
            x, mc = f"{h}.mlp.experts.{e * per_rank + local}", f"{m}.mlp.experts.local_experts.{local}"
            put(f"{mc}.linear_fc1.weight", rows(piece(hf, scheme, f"{x}.gate_proj.weight"),
                                                piece(hf, scheme, f"{x}.up_proj.weight")))
            put(f"{mc}.linear_fc2.weight", piece(hf, scheme, f"{x}.down_proj.weight"))
    if s == pp - 1:
        put("decoder.final_layernorm.weight", {"": hf["model.norm.weight"]})
        put("output_layer.weight", split_rows("lm_head.weight"))
    return out


def expected_deepseek(hf, scheme, r, mp=2) -> dict:
    out = {}

    def put(ds, parts):  # DeepSeek's Linear: `weight` (whatever the format) + `scale`
        out.update({ds + (".scale" if k == "_scale" else ".weight"): v for k, v in parts.items()})

    def split(name, axis):
        n = hf.get(name, hf.get(name + "_packed")).shape[0] if axis == 0 else 2048
        return piece(hf, scheme, name, axis, r * n // mp, (r + 1) * n // mp)
    put("embed", split("model.embed_tokens.weight", 0))
    put("head", split("lm_head.weight", 0))
    put("norm", {"": hf["model.norm.weight"]})
    for i in range(LAYERS):
        h, d = f"model.layers.{i}", f"layers.{i}"
        put(f"{d}.attn_norm", {"": hf[f"{h}.input_layernorm.weight"]})
        put(f"{d}.ffn_norm", {"": hf[f"{h}.post_attention_layernorm.weight"]})
        put(f"{d}.attn.wq", split(f"{h}.self_attn.q_proj.weight", 0))
        put(f"{d}.attn.wo", split(f"{h}.self_attn.o_proj.weight", 1))
        for x in ("k_proj", "v_proj"):  # no DeepSeek counterpart: replicated under their own names
            put(f"{d}.attn.{x}", piece(hf, scheme, f"{h}.self_attn.{x}.weight"))
        for x in ("q_norm", "k_norm"):
            put(f"{d}.attn.{x}", {"": hf[f"{h}.self_attn.{x}.weight"]})
        put(f"{d}.ffn.gate", {"": hf[f"{h}.mlp.gate.weight"]})
        for ex in range(r * EXPERTS // mp, (r + 1) * EXPERTS // mp):  # routed experts only on their owner
            for hx, dx in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                put(f"{d}.ffn.experts.{ex}.{dx}", piece(hf, scheme, f"{h}.mlp.experts.{ex}.{hx}.weight"))
    return out


def _file(path) -> dict:
    with safe_open(str(path), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not same_bytes(got[k], want[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_rank_tensor_is_the_hand_cut_source(runs, scheme, layout):
    hf, dst = read_dir(runs(scheme)), runs(scheme, layout)
    assert any(k.endswith("_scale") for k in hf) and (scheme == "mxfp4") == any(k.endswith("_packed") for k in hf)
    meta = json.loads((dst / "fp8norm_parallel_layout.json").read_text())
    assert meta["scheme"] == scheme
    if layout == "deepseek-mp2":
        for r in range(2):
            assert_same(_file(dst / f"model{r}-mp2.safetensors"), expected_deepseek(hf, scheme, r))
        return
    tp, pp, ep = meta["tp"], meta["pp"], meta["ep"]
    for t in range(tp):
        for s in range(pp):
            for e in range(ep):
                assert_same(_file(dst / rank_file(t, s, e, ep)), expected_mcore(hf, scheme, tp, pp, ep, t, s, e))
    assert json.loads((dst / "config.json").read_text()) == json.loads((runs(scheme) / "config.json").read_text())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_is_byte_identical(runs, tmp_path, scheme):
    src = read_dir(runs(scheme))
    for layout in ("mcore-tp2-ep2", "mcore-pp2"):
        cli("unshard", runs(scheme, layout), tmp_path / layout)
        back = read_dir(tmp_path / layout)
        assert_same(back, src)


def test_per_channel_scales_are_whole_on_row_parallel_ranks(runs):
    hf = read_dir(runs("fp8-channel"))
    dst = runs("fp8-channel", "mcore-tp2")
    for t in range(2):
        r = _file(dst / rank_file(t, 0, 0, 1))
        for i in range(LAYERS):
            whole = hf[f"model.layers.{i}.self_attn.o_proj.weight_scale"]
            assert whole.shape == (256, 1)
            assert same_bytes(r[f"decoder.layers.{i}.self_attention.linear_proj.weight_scale"], whole)
            assert r[f"decoder.layers.{i}.self_attention.linear_proj.weight"].shape == (256, 1024)


def dequant(scheme, stored, scale):
    if scheme == "fp8-channel":
        return reference.dequant_fp8_channel(stored, scale, out_dtype=torch.float32)
    return reference.dequant_mx(stored, scale, fmt=scheme, out_dtype=torch.float32)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_rank_dequantizes_to_its_piece_of_the_source(runs, scheme):
    hf = read_dir(runs(scheme))
    ws = "weight_packed" if scheme == "mxfp4" else "weight"
    full = {x: dequant(scheme, hf[f"model.layers.1.self_attn.{x}_proj.{ws}"],
                       hf[f"model.layers.1.self_attn.{x}_proj.weight_scale"]) for x in "qkvo"}
    r1 = _file(runs(scheme, "mcore-tp2") / rank_file(1, 0, 0, 1))
    att = "decoder.layers.1.self_attention"
    proj = dequant(scheme, r1[f"{att}.linear_proj.{ws}"], r1[f"{att}.linear_proj.weight_scale"])
    assert torch.equal(proj, full["o"][:, 1024:])
    qkv = dequant(scheme, r1[f"{att}.linear_qkv.{ws}"], r1[f"{att}.linear_qkv.weight_scale"])
    first_group = torch.cat([full["q"][1024:1280], full["k"][512:640], full["v"][512:640]])  # group 4 of 8
    assert torch.equal(qkv[:512], first_group)
    wo = _file(runs(scheme, "deepseek-mp2") / "model1-mp2.safetensors")
    wo_1 = dequant(scheme, wo["layers.1.attn.wo.weight"], wo["layers.1.attn.wo.scale"])
    assert torch.equal(wo_1, full["o"][:, 1024:])


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """A tiny dense model whose down_proj has 96 input columns: tp=2 gives 48-column pieces, off the 32 grid."""
    return make_ckpt(tmp_path_factory.mktemp("ragged") / "bf16", layers=2, hidden=256, heads=8, kv=4, head_dim=32,
                     inter=96)


@pytest.mark.parametrize("scheme", ["mxfp8", "mxfp4"])
def test_mx_column_split_off_the_grid_is_refused_in_one_line(ragged, tmp_path, scheme):
    cli("quantize", ragged, tmp_path / "q", "--to", scheme, "--skip-verify")
    # quantize keeps the 96-wide MLP in bf16; MX-quantize the down_projs by hand, as another tool could
    t, src = read_dir(tmp_path / "q"), read_dir(ragged)
    ws = "weight_packed" if scheme == "mxfp4" else "weight"
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj"
        del t[f"{name}.weight"]
        t[f"{name}.{ws}"], t[f"{name}.weight_scale"] = reference.quant_mx(src[f"{name}.weight"], fmt=scheme)
    (tmp_path / "hand").mkdir()
    save_file(t, str(tmp_path / "hand" / "model.safetensors"))
    shutil.copy(tmp_path / "q" / "config.json", tmp_path / "hand" / "config.json")
    for layout in (["--layout", "mcore", "--tp", "2", "--requant"], ["--layout", "deepseek", "--mp", "2"]):
        res = cli("shard", tmp_path / "hand", tmp_path / "out", *layout, ok=False)
        line = one_line_error(res, f"model.layers.0.mlp.down_proj.{ws}", "32-column", "not requantized")
        assert "=2" in line and not (tmp_path / "out").exists()
    cli("shard", tmp_path / "hand", tmp_path / "pp", "--layout", "mcore", "--pp", "2")  # no column split: fine
    cli("unshard", tmp_path / "pp", tmp_path / "back")
    assert_same(read_dir(tmp_path / "back"), t)


def test_block_fp8_still_splits(bf16, tmp_path):
    cli("quantize", bf16, tmp_path / "q", "--skip-verify")
    cli("shard", tmp_path / "q", tmp_path / "out", "--layout", "mcore", "--tp", "2")
    cli("unshard", tmp_path / "out", tmp_path / "back")
    assert_same(read_dir(tmp_path / "back"), read_dir(tmp_path / "q"))
    assert json.loads((tmp_path / "out" / "fp8norm_parallel_layout.json").read_text())["scheme"] == "fp8-block"


@pytest.mark.parametrize("scheme", ["fp8-channel", "mxfp4"])
def test_unshard_checks_the_schemes_tensors(runs, tmp_path, scheme):
    """A rank file missing a scale is refused before writing; row-parallel per-channel scales that differ
    between ranks are not joined (the scale is taken from one rank only when all ranks agree)."""
    mc = tmp_path / "mc"
    shutil.copytree(runs(scheme, "mcore-tp2"), mc)
    f = mc / rank_file(1, 0, 0, 1)
    t = _file(f)
    name = "decoder.layers.1.self_attention.linear_proj.weight_scale"
    if scheme == "mxfp4":
        del t[name]
        save_file(t, str(f))
        one_line_error(cli("unshard", mc, tmp_path / "back", ok=False), f"tensor {name} is missing")
        assert not (tmp_path / "back").exists()
        return
    t[name] = t[name] * 2
    save_file(t, str(f))
    one_line_error(cli("unshard", mc, tmp_path / "back", ok=False), f"{f}: its bytes differ from those the shard "
                   "run wrote")
    one_line_error(cli("unshard", mc, tmp_path / "back", "--trust-rank-files", ok=False),
                   f"1_000/model.safetensors: {name}", "differ")
    assert not (tmp_path / "back" / "model.safetensors").exists()


@pytest.mark.parametrize("layout", ["deepseek-mp2", "mcore-tp2-ep2"])
def test_resume_redoes_a_lost_rank_file_byte_identical(runs, tmp_path, layout):
    """Resume works for the schemes as for block FP8: a rank file lost from a finished shard run is written
    again, the others are kept, and DST ends byte-identical to the uninterrupted run."""
    whole = runs("mxfp4", layout)
    dst = tmp_path / "dst"
    shutil.copytree(whole, dst)
    manifest = json.loads((dst / "fp8norm-manifest.json").read_text())
    lost = sorted(manifest["done"])[1]
    (dst / lost).unlink()
    kept = {f: (dst / f).stat().st_mtime_ns for f in manifest["done"] if f != lost}
    cli("shard", runs("mxfp4"), dst, *LAYOUTS[layout], "--resume")
    assert tree_bytes(dst) == tree_bytes(whole)
    assert {f: (dst / f).stat().st_mtime_ns for f in kept} == kept  # not rewritten



@pytest.fixture(scope="module")
def converted(bf16, tmp_path_factory):
    """The block-FP8 quantization of the example, converted `--to target` once per module."""
    root = tmp_path_factory.mktemp("converted")
    cli("quantize", bf16, root / "fp8", "--skip-verify")

    def get(target):
        if not (root / target).exists():
            cli("convert", root / "fp8", root / target, "--to", target, "--skip-verify")
        return root / target
    return get


def test_block_fp8_in_the_compressed_tensors_layout_round_trips(converted, tmp_path):
    """fp8-ct (`X` + `X_scale` on the 128x128 grid) splits like block FP8: a row-parallel rank holds its
    columns and scale columns, and HF -> MCore -> HF is byte-identical."""
    src = converted("fp8-ct")
    cli("shard", src, tmp_path / "mc", "--layout", "mcore", "--tp", "2")
    hf = read_dir(src)
    name = "model.layers.0.self_attn.o_proj.weight"
    k = hf[name].shape[1]
    for t in range(2):
        rank = _file(tmp_path / "mc" / rank_file(t, 0, 0, 1))
        proj = "decoder.layers.0.self_attention.linear_proj.weight"
        assert same_bytes(rank[proj], hf[name][:, t * k // 2:(t + 1) * k // 2])
        assert same_bytes(rank[proj + "_scale"], hf[name + "_scale"][:, t * k // 256:(t + 1) * k // 256])
    cli("unshard", tmp_path / "mc", tmp_path / "back")
    assert_same(read_dir(tmp_path / "back"), hf)
    cli("shard", src, tmp_path / "ds", "--layout", "deepseek", "--mp", "2")
    rank = _file(tmp_path / "ds" / "model1-mp2.safetensors")
    assert same_bytes(rank["layers.0.attn.wo.scale"], hf[name + "_scale"][:, k // 256:])


@pytest.mark.parametrize("target", ["nvfp4", "nvfp4-ct"])
@pytest.mark.parametrize("layout", ["deepseek-mp2", "mcore-tp2"])
def test_nvfp4_checkpoints_are_refused_in_one_line(converted, tmp_path, target, layout):
    res = cli("shard", converted(target), tmp_path / "out", *LAYOUTS[layout], ok=False)
    one_line_error(res, f"{converted(target)}: NVFP4 checkpoint", "shard does not split NVFP4")
    assert not (tmp_path / "out").exists()
