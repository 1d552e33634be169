"""The conformance matrix: every format of the registry (fp8norm.formats) through every command, generated
from the registry alone, so a new format module is covered with no new test code.

Rows: the formats. Cells: made from bf16 (config accepted by the readers' parsing rules), made from block
FP8, back to bf16, `verify` GOOD on the output and FAIL naming the tensor on one damaged scale and on one
flipped element, `shard` (mcore tp2, tp2+ep2, pp2; deepseek mp2) and `unshard` byte-identical or the
format's one-line refusal, kill -9 then `--resume` byte-identical, and the independent readers the format
names. All on the tiny qwen3-moe example (dense and expert linears)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fp8norm.examples import make_example
from fp8norm.formats import FORMATS
from tests.ckpt_utils import cli, one_line_error, read_dir, tree_bytes
from tests.readers import reader

NAMES = list(FORMATS)
SHARD_LAYOUTS = {"mcore-tp2": ["--layout", "mcore", "--tp", "2"], "mcore-tp2-ep2": ["--layout", "mcore", "--tp", "2", "--ep", "2"],
                 "mcore-pp2": ["--layout", "mcore", "--pp", "2"], "deepseek-mp2": ["--layout", "deepseek", "--mp", "2"]}


def fp8norm(*args, env=None):
    """A whole process (for kill -9); the other cells run in-process (`cli`): the matrix stays quick."""
    return subprocess.run([sys.executable, "-m", "fp8norm", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


class Outputs:
    """Each format made once from the bf16 example (and the block-FP8 source), on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.bf16 = make_example(root / "bf16", "qwen3-moe", "single")
        self.fp8 = root / "fp8-src"
        cli("quantize", self.bf16, self.fp8, "-q", "--skip-verify")
        self._made: dict[str, Path] = {}

    def source(self, kind: str) -> Path:
        return self.bf16 if kind == "bf16" else self.fp8

    def made(self, name: str) -> Path:
        """The format made the way it is made here (from bf16, or from block FP8 where that is its source)."""
        if name not in self._made:
            argv, kind = FORMATS[name].maker()
            dst = self.root / f"{name}-made"
            cli(*argv, self.source(kind), dst, "-q", "--skip-verify")
            self._made[name] = dst
        return self._made[name]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return Outputs(tmp_path_factory.mktemp("conformance"))


def test_the_matrix_has_a_row_per_registered_format():
    """Its rows are the registry; the CLI's --to choices are the registry's names (one vocabulary)."""
    from fp8norm import cli

    assert NAMES == sorted(NAMES) and len(NAMES) == len(FORMATS) >= 9
    quantize = {f.from_bf16[2] for f in FORMATS.values() if (f.from_bf16 or ())[:1] == ("quantize",)}
    convert = {argv[2] for f in FORMATS.values() for argv in (f.from_bf16, f.from_fp8) if (argv or ())[:1] == ("convert",)}
    assert set(cli.QUANTIZE_FORMATS) == quantize
    assert set(cli.CONVERT_FORMATS) == convert


@pytest.mark.parametrize("name", NAMES)
def test_made_with_a_config_the_readers_accept(outputs, name):
    fmt = FORMATS[name]
    config = json.loads((outputs.made(name) / "config.json").read_text())
    assert fmt.config_problems(config) == []
    tensors = read_dir(outputs.made(name))
    assert tensors, name


@pytest.mark.parametrize("name", NAMES)
def test_made_from_block_fp8(outputs, name, tmp_path):
    fmt = FORMATS[name]
    if fmt.from_fp8 is None:
        if fmt.layout == "hf-fp8" and fmt.scale_block == (128, 128):
            return  # block FP8 is the source itself
        from fp8norm.convert import ConvertError, build_convert_plan

        with pytest.raises(ConvertError) as e:  # not a `convert --to` choice; the library refuses it in one line
            build_convert_plan(outputs.fp8, name)
        assert str(e.value).startswith(f"{outputs.fp8}: {name} ") and "\n" not in str(e.value)
        return
    cli(*fmt.from_fp8, outputs.fp8, tmp_path / "o", "-q")
    assert fmt.config_problems(json.loads((tmp_path / "o" / "config.json").read_text())) == []


@pytest.mark.parametrize("name", NAMES)
def test_back_to_bf16_within_the_formats_floor(outputs, name, tmp_path):
    fmt = FORMATS[name]
    res = cli("convert", outputs.made(name), tmp_path / "back", "--to", "bf16", "-q", ok=fmt.floor_sqnr_db is not None)
    if fmt.floor_sqnr_db is None:  # dense already: a one-line refusal
        one_line_error(res, "holds no FP8 weights to convert to bf16")
        return
    src, back = read_dir(outputs.bf16), read_dir(tmp_path / "back")
    assert set(back) == set(src)
    for key, x in src.items():
        y = back[key]
        assert y.shape == x.shape and y.dtype == x.dtype, key
        if fmt.floor_sqnr_db is None or x.dim() < 2:
            continue
        err = (y.float() - x.float()).pow(2).sum()
        sqnr = 10 * torch.log10(x.float().pow(2).sum() / err).item() if err > 0 else float("inf")
        # heavy-tailed tiny weights with outlier input channels: a few dB under the floor (int4's evenly
        # spaced codes, 128 a scale, lose the most: 7.0 dB; mxfp4's 32 a scale 2.8)
        assert sqnr >= fmt.floor_sqnr_db - 7.5, (key, sqnr)


def damage(path: Path, what: str) -> str:
    """Damage one tensor of the checkpoint in place: a scale x4, or one element's byte flipped; returns its name."""
    from safetensors.torch import load_file, save_file

    (shard,) = sorted(path.glob("*.safetensors"))[:1]
    tensors = load_file(shard)
    scale_names = [k for k in tensors if k.endswith(("_scale_inv", ".weight_scale")) and tensors[k].dtype != torch.uint8]
    if what == "scale":
        name = sorted(k for k in scale_names if "mlp" in k)[0] if scale_names else sorted(
            k for k in tensors if k.endswith(".weight_scale"))[0]
        t = tensors[name]
        tensors[name] = (t.float() * 4).to(t.dtype) if t.dtype != torch.uint8 else t + 2
    else:
        name = sorted(k for k in tensors if k.endswith((".weight", ".weight_packed")) and tensors[k].dim() >= 2
                      and tensors[k].dtype not in (torch.bfloat16, torch.float16, torch.float32) and "mlp" in k)[0]
        raw = tensors[name].view(torch.uint8).clone()
        raw.view(-1)[7] ^= 0x25
        tensors[name] = raw.view(tensors[name].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("name", NAMES)
def test_verify_passes_a_correct_output_and_fails_damage_naming_the_tensor(outputs, name, tmp_path):
    fmt = FORMATS[name]
    if fmt.floor_sqnr_db is None:  # dense: nothing quantized, nothing to check or damage
        res = cli("verify", outputs.made(name), outputs.made(name), "--all")
        assert "Nothing was checked" in res.output
        return
    res = cli("verify", outputs.bf16, outputs.made(name), "--all")
    assert "FAIL 0" in res.output
    for what in ("scale", "element"):
        bad = tmp_path / what
        subprocess.run(["cp", "-r", str(outputs.made(name)), str(bad)], check=True)
        tensor = damage(bad, what)
        res = cli("verify", outputs.bf16, bad, "--all", ok=False)
        assert res.exit_code == 3, (what, res.output[-2000:])
        module = tensor.rsplit(".", 1)[0]
        assert module in res.output, (what, tensor)


@pytest.mark.parametrize("layout", list(SHARD_LAYOUTS))
@pytest.mark.parametrize("name", NAMES)
def test_shard_and_unshard_round_trip_or_refuse_in_one_line(outputs, name, layout, tmp_path):
    fmt = FORMATS[name]
    res = cli("shard", outputs.made(name), tmp_path / "ranks", *SHARD_LAYOUTS[layout], "-q", ok=fmt.shard_refusal is None)
    if fmt.shard_refusal is not None:
        one_line_error(res, fmt.shard_refusal)
        assert not any((tmp_path / "ranks").glob("**/*.safetensors"))
        return
    if not layout.startswith("mcore"):
        return  # deepseek rank files are for inference engines: no way back
    cli("unshard", tmp_path / "ranks", tmp_path / "hf", "-q")
    assert read_dir(tmp_path / "hf").keys() == read_dir(outputs.made(name)).keys()
    for key, t in read_dir(outputs.made(name)).items():
        assert torch.equal(read_dir(tmp_path / "hf")[key].view(torch.uint8), t.view(torch.uint8)), key


@pytest.mark.parametrize("name", NAMES)
def test_killed_then_resumed_is_byte_identical(outputs, name, tmp_path, monkeypatch):
    argv, kind = FORMATS[name].maker()
    args = [outputs.source(kind), "-q", "--skip-verify", "--max-shard-size", "1MB"]
    counted, clean, dst = tmp_path / "points", tmp_path / "clean", tmp_path / "killed"
    from fp8norm import _faults

    monkeypatch.setattr(_faults, "_passed", 0)  # the points of this run alone (the counter is per process)
    monkeypatch.setenv("FP8NORM_COUNT_POINTS", str(counted))
    cli(*argv, args[0], clean, *args[1:])
    monkeypatch.delenv("FP8NORM_COUNT_POINTS")
    res = fp8norm(*argv, args[0], dst, *args[1:], env={"FP8NORM_KILL_AT": str(int(counted.read_text()) // 2)})
    assert res.returncode == -9, res.stderr
    cli(*argv, args[0], dst, *args[1:], "--resume")
    a, b = tree_bytes(clean), tree_bytes(dst)
    a.pop("fp8norm.json", None), b.pop("fp8norm.json", None)
    assert a == b


@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].readers])
def test_the_independent_readers_load_it(outputs, name):
    fmt = FORMATS[name]
    path = outputs.made(name)
    if "transformers" in fmt.readers:
        transformers = reader("transformers")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        with torch.no_grad():
            logits = model(torch.arange(8).unsqueeze(0)).logits
        assert torch.isfinite(logits).all()
    if "compressed-tensors" in fmt.readers:
        reader("compressed_tensors")
        from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer

        weights = CompressedTensorsDequantizer(path, dtype=torch.float32).validate(dict(read_dir(path)))
        src = read_dir(outputs.bf16)
        dense = [k for k in weights if k.endswith(".weight") and k in src and src[k].dim() == 2]
        assert dense and all(torch.isfinite(weights[k]).all() for k in dense)


def test_the_readme_format_table_is_the_registry():
    from fp8norm.formats import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- formats table: fp8norm.formats.markdown_table() -->\n")
    end = readme.index("\n<!-- end of formats table -->", start)
    assert readme[start:end].split("\n", 1)[1] == markdown_table()
