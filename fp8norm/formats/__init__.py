"""The formats fp8norm writes, one module each, gathered into one registry.

A module here states what its format *is*, for every command and test to read instead of knowing it:
its element and scale geometry, the layout and config it writes, how each command makes it, what
`verify` checks and the format's own error floor, how `shard` treats it, which independent readers
load it, and the rules vLLM / transformers apply when they parse its config (transcribed from their
source, cited). `tests/test_conformance.py` runs every format through every command from this
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
    library_scheme: str | None = None  # the library's name of `quantize --to NAME` (fp8norm.schemes), where it differs

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
    """The library's scheme name for `quantize --to VALUE` (fp8norm.schemes)."""
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
