"""The formats fp8norm writes, one module each, gathered into one registry.

A module here states what its format *is*, for every command and test to read instead of knowing it:
its element and scale geometry, the layout and config it writes, how each command makes it, what
`verify` checks and the format's own error floor, how `shard` treats it, which independent readers
load it, and the rules vLLM / transformers apply when they parse its config (transcribed from their
source, cited). Beside that data a module defines the format's behaviour, the methods of `Format`
every command calls instead of branching on a name: detect(), check_sources(), outputs(), encode(),
decode(), quantization_config(), extra_files(), convert_decision(), compare_member(). What a layout
family shares is one module here (compressed_tensors.py, mx.py; BlockFp8 in fp8_block.py, Nvfp4 in
nvfp4.py). `tests/test_conformance.py` runs every format through every command from this
registry alone: a new format is a new module here and is covered without new test code.

The numerics themselves (rules, Triton kernels, torch twins) live below fp8norm, in
fp8norm.kernels.numerics / fp8norm.kernels / fp8norm.reference, one module per format there too.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

ConfigRule = Callable[[dict], list]


@dataclass(frozen=True)
class Member:
    """One quantized weight of an output verify judges per module: the tensors it is stored as, in
    outputs()' order (its elements, its group/row scale, then what else the format stores with them:
    NVFP4's global scale, W4A16's weight_shape), and where its source is: (source tensor, index in
    compressed_tensors.split_source, or None for the whole tensor)."""
    tensors: tuple[str, ...]
    source: tuple[str, int | None] | None

    @property
    def elements(self) -> str:
        return self.tensors[0]

    @property
    def scale(self) -> str:
        return self.tensors[1]


@dataclass(frozen=True)
class Format:
    name: str                    # the one name every command uses (`--to NAME`)
    summary: str
    element: str                 # e4m3, e2m1, bf16
    scale_block: tuple           # elements one scale covers, per axis (rows, columns); None = the whole axis
    elements_per_byte: int       # 2 for 4-bit elements packed two a byte
    layout: str                  # hf-fp8 (DeepSeek / transformers FP8), compressed-tensors, modelopt, dense
    # How each command makes it, as the words after `fp8norm` (SRC and DST are appended by the caller):
    from_bf16: tuple | None      # from a bf16/fp16 checkpoint (None: not a conversion fp8norm makes)
    from_fp8: tuple | None       # from a block-FP8 checkpoint (None: not a conversion fp8norm makes)
    floor_sqnr_db: float | None  # the format's own rounding floor on Gaussian weights (None: lossless)
    # `shard`/`unshard`: None = split and joined byte-identically; else the one-line refusal they give
    shard_refusal: str | None = None
    readers: tuple = ()          # independent readers that load it here: transformers, compressed-tensors
    config_rules: tuple = ()     # ConfigRule functions: problems a reader would have parsing config.json
    aliases: tuple = ()          # old spellings of `--to NAME` (still accepted, hidden from --help)
    library_scheme: str | None = None  # the library's name of `quantize --to NAME` (fp8norm.quantize), where it differs
    # As a convert source: where detect() runs among the formats (None: never detected as a source), and
    # the kind fp8norm.json records (`source_format`). The suffix of a weight's scale tensor.
    detect_order: int | None = None
    source_kind: str | None = None
    scale_suffix: str = "_scale_inv"
    # How `verify` judges it: the element format and bands it shares with others (fp8norm.verify)
    verify_key: str = "fp8-block"
    weight_label: str = "FP8"    # the report's name for its quantized weights
    # (floor relative RMS error, SQNR GOOD from, WARN down to) of its element format as it stores it;
    # None: e4m3 in 128x128 blocks, the floor and bands of block FP8 (fp8norm.verify)
    verify_bands: tuple | None = None
    # (largest value, exponent of the smallest normal, mantissa bits) of an element verify does not know
    element_range: tuple | None = None
    serve_note: str | None = None  # what serving the output needs, after the `vllm serve` hint
    dense_dtype: str | None = None  # a dense target: the safetensors dtype it dequantizes to

    # ---- behaviour: the defaults of a format that quantizes nothing; layout families override them
    takes_mx_rule = False        # `--mx-rule` applies (an E8M0 scale rule, fp8norm.kernels.numerics.mx)
    quantizes_anew = False       # convert rounds source values anew (from bf16 or dequantized FP8)
    needs_global_amax = False    # convert's pre-pass: one global amax per fused group
    per_module = False           # verify judges its weights per module (Member), compare_member()
    tensors_per_member = 1       # the tensors one member is stored as (Member.tensors)
    saturates = False            # its scales let a block's largest elements saturate (clipping is the format's)
    ties_to_even = False         # e2m1 quotients halfway between two values are stored as the even one
    keeps_scaled_fp8 = False     # block FP8 weights (with `_scale_inv`) may be kept beside its own
    requantizes_fp8 = False      # rounds FP8 source values a second time (verify allows 1.5 steps)
    extra_file_names: tuple = ()  # the files extra_files() may write (a convert to another format skips them)
    unaligned_error_rule = None  # a KEEP rule that is an error unless --keep-unaligned

    @property
    def kind(self) -> str:
        """The kind fp8norm.json records of a source in this format."""
        return self.source_kind or self.library_scheme or self.name

    def detect(self, config: dict, tensors: dict):
        """The block size of a checkpoint in this format, from its config.json and tensors; None if it
        is not in it. Raises ValueError for a layout this format's family cannot read."""
        return None

    # -- as a convert source
    def scaled_weights(self, tensors: dict, skip=frozenset()) -> dict[str, str]:
        """weight -> its scale tensor: every FP8 weight stored with `scale_suffix` (not in `skip`)."""
        from ..st_io import FP8_DTYPES

        return {n: n + self.scale_suffix for n, i in tensors.items()
                if i.dtype in FP8_DTYPES and n + self.scale_suffix in tensors and n not in skip}

    def global_scaled_members(self, tensors: dict) -> dict[str, tuple[str, str, str]]:
        """Weights stored with two tensors beside their elements (a block scale and a global scale, or a
        group scale and the weight's shape): packed -> (scale, the other tensor, the dequantized
        weight's name). Empty in formats that store one scale per weight."""
        return {}

    @property
    def member_rule_label(self) -> str:
        """How a convert rule names a weight read with its global_scaled_members() tensors (`nvfp4->bf16`)."""
        return self.verify_key

    def unpacked_shape(self, dtype: str, shape: tuple) -> tuple:
        """The shape of the matrix a stored weight of safetensors `dtype` and `shape` holds: packed
        4-bit elements (U8, two a byte) count twice."""
        return (*shape[:-1], 2 * shape[-1]) if dtype == "U8" else tuple(shape)

    def check_sources(self, ckpt, scale_of: dict[str, str], block_size) -> None:
        """Dtypes, shapes and values of the scaled weights of a checkpoint in this format, before
        anything is read back: a PlanError of one line naming the tensor (convert, verify, shard)."""
        from ..source_checks import check_fp8_sources

        check_fp8_sources(ckpt, scale_of, block_size)

    def refuse_target(self, src, target: "Format", members: dict) -> str | None:
        """Why a source in this format does not convert to `target` (None: it does)."""
        return None

    def refuse_source(self, src, source: "Format") -> str | None:
        """Why this target is not made from a `source` checkpoint (None: it is)."""
        return None

    @property
    def rule_label(self) -> str:
        """How a convert rule names a weight read from this format (`fp8->bf16`)."""
        return "fp8"

    def decode(self, xs: list, block_size, out_dtype):
        """A stored weight and its scales -> its values in `out_dtype` (dense)."""
        from .. import dispatch

        return dispatch.dequant_fp8_block(xs[0], xs[1], block_size=block_size, out_dtype=out_dtype)

    # -- as a convert target
    def convert_decision(self, name: str, info, scale: str | None, candidate: bool, source: "Format"):
        """(decision, rule) of a weight of a `source` checkpoint (scale: its scale tensor; candidate: a
        weight this target would round, FP8 or a bf16 linear); None: not converted, kept."""
        return None

    def outputs(self, name: str, shape: tuple, dtype: str = "BF16") -> list:
        """The tensors (OutEntry) one rounded weight of safetensors `dtype` becomes, in encode()'s order."""
        raise NotImplementedError(self.name)

    def kept_reason(self, name: str, shape: tuple) -> str | None:
        """Why a weight the rules would round has no readable layout here (None: it has one)."""
        return None

    def encode(self, x, *, name: str = "", src_scale_inv=None, src_block_size=(128, 128), rule=None,
               global_amax=None) -> list:
        """One weight (bf16, or FP8 with its block scales) -> its stored tensors, in outputs()' order."""
        raise NotImplementedError(self.name)

    def quantization_config(self, plan) -> dict | None:
        """config.json's quantization_config of an output in this format (None: none)."""
        return None

    def extra_files(self, plan) -> dict[str, str]:
        """Files beside config.json this format writes: {name: text}."""
        return {}

    # -- as `verify` reads an output in it (per_module formats; block FP8 is verify's own)
    def written_members(self, qt: dict, st: dict) -> dict[str, Member]:
        """The quantized weights of output tensors `qt`, by key, with their sources in `st`."""
        raise NotImplementedError(self.name)

    def output_key(self, stored: str) -> str:
        """The key of the member whose elements are the output tensor `stored`."""
        return stored

    def source_parts(self, name: str, x) -> list:
        """A source weight as its members' source matrices, in outputs()' order."""
        return [x]

    def check_member(self, ckpt, mem: Member) -> None:
        """Dtypes, shapes and values of one member's tensors in `ckpt`: a PlanError naming the tensor."""
        self.check_sources(ckpt, {mem.elements: mem.scale}, None)

    def compare_member(self, key: str, shard: str, stored: list, x, bands, mx_rule=None):
        """One member's stored tensors against its source matrix `x`: a verify.TensorCheck."""
        raise NotImplementedError(self.name)

    def config_beside(self, quant) -> dict:
        """The quantization config an output in `quant` declares outside config.json ({}: none)."""
        return {}

    def mx_rule(self, rule: str | None, spelled: str) -> str | None:
        """The MX scale rule a run to this format (named `spelled`) uses; giving one where none applies is
        an error."""
        if rule is not None:
            raise ValueError(f"--mx-rule applies to mxfp8 and mxfp4, not {spelled}")
        return None

    def maker(self) -> tuple[tuple, str]:
        """How it is made here: (the words after `fp8norm`, "bf16" or "fp8": the kind of source they take)."""
        return (self.from_bf16, "bf16") if self.from_bf16 is not None else (self.from_fp8, "fp8")

    def config_problems(self, config: dict) -> list[str]:
        """What vLLM / transformers would refuse or misread in this config.json (empty: none)."""
        return [p for rule in self.config_rules for p in rule(config)]


def _load() -> dict[str, Format]:
    formats = {}
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{m.name}")
        for f in getattr(module, "FORMATS", (module.FORMAT,) if hasattr(module, "FORMAT") else ()):
            if f.name in formats:
                raise RuntimeError(f"format {f.name!r} is defined twice ({module.__name__})")
            formats[f.name] = f
    return formats


FORMATS: dict[str, Format] = _load()


def detect(config: dict, tensors: dict) -> tuple[Format, tuple]:
    """The format of a checkpoint (as convert, verify and shard read it) and its block size."""
    for f in sorted((f for f in FORMATS.values() if f.detect_order is not None), key=lambda f: f.detect_order):
        block = f.detect(config, tensors)
        if block is not None:
            return f, tuple(block)
    raise ValueError("no format reads this checkpoint")


def made_by(command: str, value: str, *options: str) -> Format | None:
    """The format `fp8norm COMMAND --to VALUE [OPTION VALUE]...` makes, None if none."""
    for f in FORMATS.values():
        if (command, "--to", value, *options) in (f.from_bf16, f.from_fp8):
            return f
    return None


def get(name: str) -> Format:
    for f in FORMATS.values():
        if name == f.name or name in f.aliases:
            return f
    raise ValueError(f"unknown format {name!r}: expected one of {', '.join(FORMATS)}")


def cli_choices(command: str) -> list[str]:
    """The `--to` values `command` (quantize or convert) accepts: the words that make each format."""
    choices = []
    for f in FORMATS.values():
        for argv in (f.from_bf16, f.from_fp8):
            if argv and argv[0] == command and argv[2] not in choices:
                choices.append(argv[2])
    return choices


def cli_aliases() -> dict[str, tuple[str, dict]]:
    """Old spellings of a `--to` value: {old: (the value, {other option's parameter: value})}, e.g.
    fp8-ue8m0 -> fp8 with --scale-fmt ue8m0."""
    aliases = {}
    for f in FORMATS.values():
        words = (f.from_bf16 or f.from_fp8)[1:]  # --to VALUE [--option value]...
        value = words[1]
        extra = {words[i].lstrip("-").replace("-", "_"): words[i + 1] for i in range(2, len(words), 2)}
        for old in f.aliases + ((f.name,) if f.name != value else ()):
            aliases[old] = (value, extra)
    return aliases


def library_scheme(value: str) -> str:
    """The library's scheme name for `quantize --to VALUE` (fp8norm.quantize)."""
    for f in FORMATS.values():
        if f.from_bf16 and f.from_bf16[:3] == ("quantize", "--to", value):
            return f.library_scheme or value
    return value


def _scales(f: Format) -> str:
    if not f.scale_block:
        return "none"
    rows, cols = f.scale_block
    if rows == 1 and cols is None:
        return "one per row"
    return f"one per {rows}x{cols} tile" if rows > 1 else f"one per {cols} along a row"


def markdown_table() -> str:
    """The README's format table, rendered from the registry (tests/test_conformance.py holds them equal)."""
    rows = ["| format | made by | element | scales | layout | verify floor | shard / unshard |",
            "| --- | --- | --- | --- | --- | ---: | --- |"]
    for f in FORMATS.values():
        made = "; ".join(f"`fp8norm {' '.join(argv)}` from {kind}"
                         for argv, kind in ((f.from_bf16, "bf16"), (f.from_fp8, "block FP8")) if argv)
        floor = "lossless" if f.floor_sqnr_db is None else f"{f.floor_sqnr_db:g} dB"
        shard = "byte-identical round trip" if f.shard_refusal is None else "refused in one line"
        rows.append(f"| `{f.name}` | {made} | {f.element} | {_scales(f)} | {f.layout} | {floor} | {shard} |")
    return "\n".join(rows)
