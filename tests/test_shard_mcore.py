"""HF <-> Megatron-Core layout (fp8norm.shard.mcore): round trips, hand-checked rank contents, FP8 tiles,
errors before writing, requantization and per-module memory."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8norm.kernels.numerics import fp8_block as nx
from fp8norm.examples import make_example
from fp8norm.reference import dequant_fp8_block, quant_fp8_block
from fp8norm.shard.mcore import (ITER_DIR, LAYOUT_NAME, TRACKER_NAME, hf_to_mcore, mcore_to_hf, plan_mcore,
                                 rank_file)
from tests.ckpt_utils import read_dir, same_bytes
from tests.memory_utils import JOBS_IN_FLIGHT, track_reads

COMBOS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 2, 2)]
QKV = ("q_proj", "k_proj", "v_proj")


def _linear_names(tensors):
    return [n for n, t in tensors.items() if t.dim() == 2 and "embed" not in n and "lm_head" not in n
            and not n.endswith("mlp.gate.weight")]


def make_ckpt(root: Path, *, layers=4, hidden=256, heads=8, kv=4, head_dim=32, inter=256, vocab=256,
              experts=0, moe_inter=64, qk_norm=True, fp8=False, bias=False, tied=False, seed=0) -> Path:
    """A tiny Llama/Qwen3 (experts=0) or Qwen3-MoE checkpoint; FP8 linears (128x128 blocks) if fp8."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = rnd(hidden, scale=1.0)
        t[f"{p}.self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden)
        t[f"{p}.self_attn.k_proj.weight"] = rnd(kv * head_dim, hidden)
        t[f"{p}.self_attn.v_proj.weight"] = rnd(kv * head_dim, hidden)
        if bias:
            for x, n in (("q", heads), ("k", kv), ("v", kv)):
                t[f"{p}.self_attn.{x}_proj.bias"] = rnd(n * head_dim)
        t[f"{p}.self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim)
        if qk_norm:
            t[f"{p}.self_attn.q_norm.weight"] = rnd(head_dim, scale=1.0)
            t[f"{p}.self_attn.k_norm.weight"] = rnd(head_dim, scale=1.0)
        t[f"{p}.post_attention_layernorm.weight"] = rnd(hidden, scale=1.0)
        if experts:
            t[f"{p}.mlp.gate.weight"] = rnd(experts, hidden)
            for e in range(experts):
                t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = rnd(moe_inter, hidden)
                t[f"{p}.mlp.experts.{e}.up_proj.weight"] = rnd(moe_inter, hidden)
                t[f"{p}.mlp.experts.{e}.down_proj.weight"] = rnd(hidden, moe_inter)
        else:
            t[f"{p}.mlp.gate_proj.weight"] = rnd(inter, hidden)
            t[f"{p}.mlp.up_proj.weight"] = rnd(inter, hidden)
            t[f"{p}.mlp.down_proj.weight"] = rnd(hidden, inter)
    t["model.norm.weight"] = rnd(hidden, scale=1.0)
    if not tied:
        t["lm_head.weight"] = rnd(vocab, hidden)
    if fp8:
        for n in _linear_names(dict(t)):
            q, s = quant_fp8_block(t[n])
            t[n], t[n + "_scale_inv"] = q, s
    root.mkdir(parents=True)
    names = list(t)
    half = len(names) // 2  # two shards with an index, as HF checkpoints come
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ns in files.items():
        save_file({n: t[n].contiguous() for n in ns}, str(root / f), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {n: f for f, ns in files.items() for n in ns}}))
    cfg = {"architectures": ["Qwen3MoeForCausalLM" if experts else "Qwen3ForCausalLM"], "hidden_size": hidden,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
           "num_hidden_layers": layers, "vocab_size": vocab, "intermediate_size": inter}
    if experts:
        cfg.update(num_experts=experts, moe_intermediate_size=moe_inter)
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "tokenizer.model").write_bytes(bytes(range(256)))  # binary, copied as bytes
    return root


KINDS = {
    "dense": dict(),
    "dense-bias": dict(bias=True, qk_norm=False),
    "moe": dict(experts=4),
    "fp8": dict(fp8=True, heads=4, kv=2, head_dim=128),
    "fp8-moe": dict(fp8=True, heads=4, kv=2, head_dim=128, experts=4, moe_inter=128),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("src")
    return {k: make_ckpt(base / k, **kw) for k, kw in KINDS.items()}


def rank(dst, t, s, e=0, ep=1) -> dict[str, torch.Tensor]:
    path = Path(dst) / rank_file(t, s, e, ep)
    with safe_open(str(path), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    bad = [k for k in a if not same_bytes(a[k], b[k])]
    assert not bad, bad[:5]


# ---------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("tp,pp,ep", COMBOS)
@pytest.mark.parametrize("kind,gg", [("dense", False), ("moe", False), ("moe", True), ("fp8", False),
                                     ("fp8-moe", True)])
def test_round_trip(sources, tmp_path, kind, gg, tp, pp, ep):
    src = sources[kind]
    mc, back = tmp_path / "mcore", tmp_path / "hf"
    s1 = hf_to_mcore(src, mc, tp=tp, pp=pp, ep=ep, grouped_gemm=gg, progress=False)
    assert s1.files == s1.files_written == tp * pp * ep
    n_src = sum(len(safe_open(f, "pt").keys()) for f in src.glob("*.safetensors"))
    n_out = sum(len(safe_open(f, "pt").keys()) for f in mc.rglob("*.safetensors"))
    assert (s1.tensors_in, s1.tensors_out) == (n_src, n_out)  # what the summary prints
    assert f"{n_src} read -> {n_out} written in {tp * pp * ep} rank file(s)" in s1.format()
    dirs = sorted(p.name for p in (mc / ITER_DIR).iterdir())
    suffix = ep > 1
    assert dirs == sorted(f"mp_rank_{t:02d}_{s:03d}" + (f"_{e:03d}" if suffix else "")
                          for t in range(tp) for s in range(pp) for e in range(ep))
    assert all((mc / ITER_DIR / d / "model.safetensors").is_file() for d in dirs)
    assert (mc / TRACKER_NAME).read_text().strip() == "0"
    assert (mc / "config.json").read_bytes() == (src / "config.json").read_bytes()
    layout = json.loads((mc / LAYOUT_NAME).read_text())
    assert (layout["tp"], layout["pp"], layout["ep"]) == (tp, pp, ep)
    mcore_to_hf(mc, back, progress=False)
    assert_same_tensors(read_dir(src), read_dir(back))
    for f in ("config.json", "tokenizer.json", "tokenizer.model"):
        assert (back / f).read_bytes() == (src / f).read_bytes()


def test_round_trip_bias_and_shards(sources, tmp_path):
    src = sources["dense-bias"]
    hf_to_mcore(src, tmp_path / "mc", tp=2, pp=2, progress=False)
    r1 = rank(tmp_path / "mc", 1, 0)
    hf = read_dir(src)
    b = "model.layers.0.self_attn"
    # kv=4 groups of 32-dim heads, 2 q heads per group; tp rank 1 holds groups 2 and 3.
    q, k, v = (hf[f"{b}.{x}.bias"] for x in QKV)
    want = torch.cat([q[128:192], k[64:96], v[64:96], q[192:256], k[96:128], v[96:128]])
    assert torch.equal(r1["decoder.layers.0.self_attention.linear_qkv.bias"], want)
    mcore_to_hf(tmp_path / "mc", tmp_path / "hf", max_shard_size="300KB", progress=False)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    assert_same_tensors(hf, read_dir(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------------
# Rank contents by hand


def test_tied_embeddings_have_no_output_layer(tmp_path):
    src = make_ckpt(tmp_path / "src", layers=2, tied=True)
    hf_to_mcore(src, tmp_path / "mc", tp=2, pp=2, progress=False)
    assert not any(k.startswith("output_layer") for k in rank(tmp_path / "mc", 0, 1))
    mcore_to_hf(tmp_path / "mc", tmp_path / "hf", progress=False)
    assert_same_tensors(read_dir(src), read_dir(tmp_path / "hf"))


def test_dense_rank_contents(sources, tmp_path):
    src, mc = sources["dense"], tmp_path / "mc"
    hf = read_dir(src)
    hf_to_mcore(src, mc, tp=2, pp=2, progress=False)
    r = {(t, s): rank(mc, t, s) for t in range(2) for s in range(2)}
    # embedding on stage 0 only, split over vocab; output layer and final norm on the last stage only
    assert torch.equal(r[1, 0]["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"][128:])
    assert torch.equal(r[0, 1]["output_layer.weight"], hf["lm_head.weight"][:128])
    assert torch.equal(r[1, 1]["decoder.final_layernorm.weight"], hf["model.norm.weight"])
    for t in range(2):
        assert "embedding.word_embeddings.weight" not in r[t, 1]
        assert "output_layer.weight" not in r[t, 0] and "decoder.final_layernorm.weight" not in r[t, 0]
    # stage 1 holds HF layers 2 and 3 as local 0 and 1
    L, p = "decoder.layers.0", "model.layers.2"
    assert {k.split(".")[2] for k in r[0, 1] if k.startswith("decoder.layers.")} == {"0", "1"}
    q, k, v = (hf[f"{p}.self_attn.{x}.weight"] for x in QKV)
    want = torch.cat([q[128:192], k[64:96], v[64:96], q[192:256], k[96:128], v[96:128]])
    assert torch.equal(r[1, 1][f"{L}.self_attention.linear_qkv.weight"], want)
    want0 = torch.cat([q[0:64], k[0:32], v[0:32], q[64:128], k[32:64], v[32:64]])
    assert torch.equal(r[0, 1][f"{L}.self_attention.linear_qkv.weight"], want0)
    assert torch.equal(r[1, 1][f"{L}.self_attention.linear_qkv.layer_norm_weight"], hf[f"{p}.input_layernorm.weight"])
    assert torch.equal(r[1, 1][f"{L}.self_attention.q_layernorm.weight"], hf[f"{p}.self_attn.q_norm.weight"])
    assert torch.equal(r[1, 1][f"{L}.self_attention.linear_proj.weight"], hf[f"{p}.self_attn.o_proj.weight"][:, 128:])
    gate, up = hf[f"{p}.mlp.gate_proj.weight"], hf[f"{p}.mlp.up_proj.weight"]
    assert torch.equal(r[1, 1][f"{L}.mlp.linear_fc1.weight"], torch.cat([gate[128:], up[128:]]))
    assert torch.equal(r[0, 1][f"{L}.mlp.linear_fc1.weight"], torch.cat([gate[:128], up[:128]]))
    assert torch.equal(r[1, 1][f"{L}.mlp.linear_fc1.layer_norm_weight"], hf[f"{p}.post_attention_layernorm.weight"])
    assert torch.equal(r[1, 1][f"{L}.mlp.linear_fc2.weight"], hf[f"{p}.mlp.down_proj.weight"][:, 128:])


def test_custom_pipeline_layers(sources, tmp_path):
    src, mc = sources["dense"], tmp_path / "mc"
    hf = read_dir(src)
    hf_to_mcore(src, mc, tp=1, pp=2, pipeline_layers="1,3", progress=False)
    s0, s1 = rank(mc, 0, 0), rank(mc, 0, 1)
    layers = lambda r: sorted({int(k.split(".")[2]) for k in r if k.startswith("decoder.layers.")})  # noqa: E731
    assert layers(s0) == [0] and layers(s1) == [0, 1, 2]
    for j in range(3):
        assert torch.equal(s1[f"decoder.layers.{j}.self_attention.linear_proj.weight"],
                           hf[f"model.layers.{j + 1}.self_attn.o_proj.weight"])
    layout = json.loads((mc / LAYOUT_NAME).read_text())
    assert layout["pipeline_layers"] == [1, 3]
    assert [(s["first_layer"], s["num_layers"]) for s in layout["stages"]] == [(0, 1), (1, 3)]
    mcore_to_hf(mc, tmp_path / "hf", progress=False)
    assert_same_tensors(hf, read_dir(tmp_path / "hf"))


@pytest.mark.parametrize("gg", [False, True])
def test_expert_ownership(sources, tmp_path, gg):
    src, mc = sources["moe"], tmp_path / "mc"
    hf = read_dir(src)
    hf_to_mcore(src, mc, tp=2, pp=2, ep=2, grouped_gemm=gg, progress=False)
    p, L = "model.layers.3", "decoder.layers.1"  # stage 1, local layer 1
    for t in range(2):
        r = rank(mc, t, 1, e=1, ep=2)
        names = [k for k in r if ".experts." in k and k.startswith(L + ".")]
        assert len(names) == 4  # 2 local experts x (fc1, fc2)
        for local, glob in ((0, 2), (1, 3)):  # EP rank 1 owns global experts 2, 3
            ex = f"{p}.mlp.experts.{glob}"
            fc1 = (f"{L}.mlp.experts.linear_fc1.weight{local}" if gg
                   else f"{L}.mlp.experts.local_experts.{local}.linear_fc1.weight")
            fc2 = fc1.replace("linear_fc1", "linear_fc2")
            assert torch.equal(r[fc1], torch.cat([hf[f"{ex}.gate_proj.weight"], hf[f"{ex}.up_proj.weight"]]))
            assert torch.equal(r[fc2], hf[f"{ex}.down_proj.weight"])  # experts are whole on every TP rank
        assert torch.equal(r[f"{L}.mlp.router.weight"], hf[f"{p}.mlp.gate.weight"])
        assert torch.equal(r[f"{L}.pre_mlp_layernorm.weight"], hf[f"{p}.post_attention_layernorm.weight"])
        assert f"{L}.mlp.linear_fc1.layer_norm_weight" not in r
    # non-expert tensors are the same in both EP ranks' files
    a, b = rank(mc, 1, 0, e=0, ep=2), rank(mc, 1, 0, e=1, ep=2)
    shared = [k for k in a if ".experts." not in k]
    assert "embedding.word_embeddings.weight" in shared
    assert all(same_bytes(a[k], b[k]) for k in shared) and set(shared) == {k for k in b if ".experts." not in k}
    layout = json.loads((mc / LAYOUT_NAME).read_text())
    assert layout["experts"]["ownership"][1] == {"ep_rank": 1, "first_expert": 2, "num_experts": 2}
    assert layout["grouped_gemm"] is gg


def test_fp8_scales_follow_tiles(sources, tmp_path):
    src, mc = sources["fp8"], tmp_path / "mc"
    hf = read_dir(src)
    hf_to_mcore(src, mc, tp=2, progress=False)
    r1 = rank(mc, 1, 0)
    p, L = "model.layers.1.self_attn", "decoder.layers.1.self_attention"
    # kv=2 groups, 2 q heads of 128 per group: rank 1 = group 1 = q rows 256:512, k/v rows 128:256
    w = r1[f"{L}.linear_qkv.weight"]
    assert w.dtype == torch.float8_e4m3fn
    q, k, v = (hf[f"{p}.{x}.weight"] for x in QKV)
    assert same_bytes(w, torch.cat([q[256:], k[128:], v[128:]]))
    qs, ks, vs = (hf[f"{p}.{x}.weight_scale_inv"] for x in QKV)
    assert same_bytes(r1[f"{L}.linear_qkv.weight_scale_inv"], torch.cat([qs[2:], ks[1:], vs[1:]]))
    # row-parallel: scale columns follow the weight columns
    os_ = hf[f"{p}.o_proj.weight_scale_inv"]
    assert same_bytes(r1[f"{L}.linear_proj.weight"], hf[f"{p}.o_proj.weight"][:, 256:])
    assert same_bytes(r1[f"{L}.linear_proj.weight_scale_inv"], os_[:, 2:])
    m, M = "model.layers.1.mlp", "decoder.layers.1.mlp"
    assert same_bytes(r1[f"{M}.linear_fc1.weight_scale_inv"],
                      torch.cat([hf[f"{m}.gate_proj.weight_scale_inv"][1:], hf[f"{m}.up_proj.weight_scale_inv"][1:]]))
    assert same_bytes(r1[f"{M}.linear_fc2.weight_scale_inv"], hf[f"{m}.down_proj.weight_scale_inv"][:, 1:])
    # bf16 tensors stay bf16 and have no scale
    assert r1["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    assert "embedding.word_embeddings.weight_scale_inv" not in r1
    layout = json.loads((mc / LAYOUT_NAME).read_text())
    assert f"{p}.q_proj.weight" in layout["fp8"]["weights"] and layout["fp8"]["requantized"] == []
    # every rank's FP8 tensor dequantizes to the matching slice of the dequantized source
    full = dequant_fp8_block(q, qs, out_dtype=torch.float32)
    part = dequant_fp8_block(w, r1[f"{L}.linear_qkv.weight_scale_inv"], out_dtype=torch.float32)
    assert torch.equal(part[:256], full[256:])


# ---------------------------------------------------------------------------------------------------
# Errors, raised before anything is written


def _raises_before_writing(tmp_path, match, src, **kw):
    dst = tmp_path / "never"
    with pytest.raises(ValueError, match=match) as ei:
        hf_to_mcore(src, dst, progress=False, **kw)
    assert not dst.exists()
    return str(ei.value)


def test_errors_before_writing(sources, tmp_path):
    src = sources["dense"]
    msg = _raises_before_writing(tmp_path, "num_key_value_heads=4", src, tp=8)
    assert "tp=8" in msg and "k_proj.weight" in msg and "[128, 256]" in msg
    msg = _raises_before_writing(tmp_path, "sums to 3", src, tp=1, pp=2, pipeline_layers="1,2")
    assert "num_hidden_layers=4" in msg
    _raises_before_writing(tmp_path, "one per stage", src, tp=1, pp=2, pipeline_layers=[1, 1, 2])
    _raises_before_writing(tmp_path, "cannot be split evenly", src, tp=1, pp=3)
    _raises_before_writing(tmp_path, "ep=3", sources["moe"], tp=1, ep=3)
    _raises_before_writing(tmp_path, "tp must be a positive int", src, tp=0)


def test_unknown_tensor_is_an_error(tmp_path):
    make_ckpt(tmp_path / "src", layers=2)
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}
    save_file(extra, str(tmp_path / "src" / "extra.safetensors"))
    (tmp_path / "src" / "model.safetensors.index.json").unlink()
    _raises_before_writing(tmp_path, "no Megatron-Core mapping.*rotary_emb", tmp_path / "src", tp=1)


def test_other_architectures_are_refused_in_one_line(tmp_path):
    """Qwen3.5 (Gated DeltaNet, fused experts, shared experts, vision tower, MTP) and DeepSeek-V3 (MLA,
    MTP layer) need model-specific Megatron-Core modules: one line names each kind with a tensor of it."""
    qwen35 = make_example(tmp_path / "qwen35", "qwen3.5-moe")
    msg = _raises_before_writing(tmp_path, "cannot map", qwen35, tp=1, pp=2)
    assert msg == (
        f"{qwen35}: --layout mcore cannot map "
        "linear attention (model.language_model.layers.0.linear_attn.A_log), "
        "fused 3-D expert tensors (model.language_model.layers.0.mlp.experts.down_proj), "
        "shared experts (model.language_model.layers.0.mlp.shared_expert.down_proj.weight), "
        "a vision tower (model.visual.blocks.0.attn.proj.bias), "
        "a multi-token-prediction block (mtp.fc.weight); "
        "it maps Llama/Qwen3 dense and Qwen3-MoE checkpoints (model.layers.N.self_attn / mlp)")
    deepseek = make_example(tmp_path / "deepseek", "deepseek-v3")
    msg = _raises_before_writing(tmp_path, "cannot map", deepseek, tp=1, pp=2)
    assert "multi-head latent attention (model.layers.0.self_attn.kv_a_proj_with_mqa.weight)" in msg
    assert "a multi-token-prediction block (model.layers.2.eh_proj.weight)" in msg
    # the built-in examples mcore does map
    for family in ("llama", "qwen3-moe"):
        src = make_example(tmp_path / family, family)
        hf_to_mcore(src, tmp_path / f"{family}-mc", tp=1, pp=2, progress=False)
        mcore_to_hf(tmp_path / f"{family}-mc", tmp_path / f"{family}-hf", progress=False)
        assert_same_tensors(read_dir(src), read_dir(tmp_path / f"{family}-hf"))


def test_no_decoder_layers_is_named(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(8, 8)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"num_attention_heads": 1, "hidden_size": 8}))
    msg = _raises_before_writing(tmp_path, "no tensor is named", root, tp=1)
    assert msg == ("no tensor is named model.layers.N.* (e.g. transformer.h.0.attn.c_attn.weight); Megatron-Core's "
                   "decoder.layers.N.* are mapped from Llama/Qwen3 dense and Qwen3-MoE checkpoints "
                   "(model.layers.N.self_attn / mlp)")


@pytest.fixture(scope="module")
def fp8_ragged(tmp_path_factory):
    # intermediate 384: tp=2 gives 192-row halves of gate/up and 192-column halves of down_proj
    return make_ckpt(tmp_path_factory.mktemp("ragged") / "src", layers=2, fp8=True, heads=4, kv=2, head_dim=128,
                     inter=384)


def test_fp8_misaligned_split_is_an_error(fp8_ragged, tmp_path):
    msg = _raises_before_writing(tmp_path, "not on a block boundary", fp8_ragged, tp=2)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "[384, 256]" in msg and "tp=2" in msg
    assert "requant" in msg
    # tp=1 is aligned: gate and up (384 rows = 3 whole blocks each) join on a block boundary
    hf_to_mcore(fp8_ragged, tmp_path / "ok", tp=1, progress=False)


def test_fp8_requant_pow2(fp8_ragged, tmp_path):
    mc = tmp_path / "mc"
    hf = read_dir(fp8_ragged)
    hf_to_mcore(fp8_ragged, mc, tp=2, requant=True, scale_fmt="ue8m0", amax_floor=1e-6, progress=False)
    layout = json.loads((mc / LAYOUT_NAME).read_text())
    req = layout["fp8"]["requantized"]
    kinds = sorted({k.split("::")[1].split(".", 3)[3] for k in req})  # "<file>::decoder.layers.N.<...>"
    assert kinds == ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    assert len(req) == 2 * 2 * 2  # 2 layers x 2 ranks x (fc1, fc2)
    r1 = rank(mc, 1, 0)
    m, M = "model.layers.0.mlp", "decoder.layers.0.mlp"
    deq = {x: dequant_fp8_block(hf[f"{m}.{x}.weight"], hf[f"{m}.{x}.weight_scale_inv"], out_dtype=torch.float32)
           for x in ("gate_proj", "up_proj", "down_proj")}
    for name, want in ((f"{M}.linear_fc1.weight", torch.cat([deq["gate_proj"][192:], deq["up_proj"][192:]])),
                       (f"{M}.linear_fc2.weight", deq["down_proj"][:, 192:])):
        w, s = r1[name], r1[name + "_scale_inv"]
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert tuple(s.shape) == nx.scale_inv_shape(tuple(w.shape), (128, 128))
        assert nx.is_power_of_two(s)
        got = dequant_fp8_block(w, s, out_dtype=torch.float32)
        assert (got - want).abs().max() <= 0.07 * want.abs().max()
    # untouched tensors are carried as they are (source scales are not pow2)
    p = "model.layers.0.self_attn"
    assert same_bytes(r1["decoder.layers.0.self_attention.linear_proj.weight_scale_inv"],
                      hf[f"{p}.o_proj.weight_scale_inv"][:, 2:])
    # back to HF: misaligned again, so requant is needed there too
    with pytest.raises(ValueError, match="requant"):
        mcore_to_hf(mc, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    mcore_to_hf(mc, tmp_path / "hf", requant=True, progress=False)
    back = read_dir(tmp_path / "hf")
    assert set(back) == set(hf)
    assert same_bytes(back[f"{p}.q_proj.weight"], hf[f"{p}.q_proj.weight"])
    got = dequant_fp8_block(back[f"{m}.down_proj.weight"], back[f"{m}.down_proj.weight_scale_inv"],
                            out_dtype=torch.float32)
    assert (got - deq["down_proj"]).abs().max() <= 0.13 * deq["down_proj"].abs().max()  # rounded twice


def test_mcore_to_hf_checks_rank_files(sources, tmp_path):
    mc = tmp_path / "mc"
    hf_to_mcore(sources["dense"], mc, tp=2, progress=False)
    f = mc / rank_file(1, 0, 0, 1)
    tensors = rank(mc, 1, 0)
    del tensors["decoder.layers.1.mlp.linear_fc2.weight"]
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match="linear_fc2.weight is missing"):
        mcore_to_hf(mc, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------------
# Memory: one module's sources at a time


def _module(name: str) -> str:
    name = name.split("::")[-1].removesuffix("_scale_inv")
    return name.rsplit(".", 2)[0]


@pytest.mark.parametrize("kind", ["fp8", "moe"])
def test_jobs_are_per_module_and_memory_bounded(sources, tmp_path, monkeypatch, kind):
    plan = plan_mcore(sources[kind], tp=2, pp=2, ep=2)
    for job in plan.jobs:
        assert len({_module(n) for n in job.sources}) == 1, job.sources
    biggest = max(len(j.sources) for j in plan.jobs)
    assert biggest == (6 if kind == "fp8" else 3)  # q, k, v (+ their scales)

    sizes = [sum(plan.ckpt.tensors[n].nbytes for n in j.sources) for j in plan.jobs]
    reads = track_reads(monkeypatch)
    hf_to_mcore(sources[kind], tmp_path / "mc", tp=2, pp=2, ep=2, progress=False)
    # the jobs in flight in the engine's stages, never a whole rank's state
    assert reads["peak"] <= JOBS_IN_FLIGHT * max(sizes) and reads["peak"] < sum(sizes), (reads, sum(sizes))
