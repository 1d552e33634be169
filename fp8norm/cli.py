"""The `fp8norm` command line: a thin layer over the library; every command is a Python function."""

from __future__ import annotations

import math
import os
import re
import shlex
import sys

import click
from click.core import ParameterSource

from . import timing  # noqa: F401 (first: starts the clock of the stages line)
from . import __version__, formats, read_ahead
from . import distributed
from .distributed import RankAborted


EXIT_INTERRUPTED = 130  # 128 + SIGINT: what shells report for a Ctrl-C


class Command(click.Command):
    """A command whose renamed options still work: each old spelling (a hidden option, or a value alias
    of a Choices option) takes effect as its new one and prints the new name once."""

    def invoke(self, ctx):
        if isinstance(ctx.params.get("src"), str):
            read_ahead.start(ctx.params["src"])  # before the command imports torch (fp8norm.read_ahead)
        if (threads := ctx.meta.pop(THREADS_TO_APPLY, None)) is not None:
            _apply_threads(ctx, *threads)
        for old, spelled, values in ctx.meta.pop(ALIASES, []):
            given = [name for name in values if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
            if given:
                raise click.UsageError(f"{old} is the old spelling of {spelled}: give only one of them")
            click.echo(f"fp8norm: {old} is now spelled {spelled}", err=True)
            ctx.params.update(values)
        return super().invoke(ctx)


ALIASES = "fp8norm.aliases"


def _apply_threads(ctx, param, value, io_threads, torch_pool) -> None:
    from .threads import configure_threads

    try:
        ctx.meta["fp8norm.threads"] = configure_threads(value, io_threads=io_threads, torch_pool=torch_pool)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def _remember_alias(ctx, old: str, spelled: str, values: dict) -> None:
    ctx.meta.setdefault(ALIASES, []).append((old, spelled, values))


def renamed(old: str, new: str, param: str, *, value=None, check=None, **option_kwargs):
    """A hidden option `old` that stands for the option `new` (parameter `param`): its value (or `value`,
    for a flag) is used as that option's, after `check` (the new option's callback), with a note."""
    def remember(ctx, p, v):
        if not (v is None or v is False or v == ()):  # 0 is a value (--samples 0), not "not given"
            if check is not None:
                v = check(ctx, p, v)
            _remember_alias(ctx, old, new if value is None else f"{new} {value}", {param: v if value is None else value})
        return v
    return click.option(old, hidden=True, expose_value=False, callback=remember, **option_kwargs)


class Choices(click.Choice):
    """A Choice with hidden value aliases: {old value: (new value, {other parameter: value})}."""

    def __init__(self, choices, aliases: dict | None = None):
        super().__init__(choices)
        self.aliases = aliases or {}

    def convert(self, value, param, ctx):
        if value in self.aliases and ctx is not None:
            new, extra = self.aliases[value]
            spelled = " ".join([f"{param.opts[0]} {new}", *(f"--{k.replace('_', '-')} {v}" for k, v in extra.items())])
            _remember_alias(ctx, f"{param.opts[0]} {value}", spelled, extra)
            value = new
        return super().convert(value, param, ctx)


class _Group(click.Group):
    """Every failure is one line on stderr and exit code 1; --debug shows the traceback instead. Ctrl-C
    says what DST holds and how to go on, exit code 130."""

    def parse_args(self, ctx, args):
        ctx.meta["fp8norm.argv"] = list(args)  # the command line as given: Ctrl-C prints how to go on
        return super().parse_args(ctx, args)

    command_class = Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt as e:
            if os.environ.get("RANK", "0") == "0":
                command = self.get_command(ctx, ctx.invoked_subcommand or "")
                writes_dst = command is not None and any(p.name == "resume" for p in command.params)
                for line in _interrupted_lines(ctx, e) if writes_dst else ["Interrupted."]:
                    click.echo(line, err=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except RankAborted:
            raise SystemExit(1) from None  # another torchrun rank failed; rank 0 reports its error once
        except Exception as e:  # noqa: BLE001 - the last line of defence of a command-line tool
            if ctx.params.get("debug"):
                raise
            if isinstance(e, (ValueError, OSError)):  # the expected failures: their message says it all
                raise click.ClickException(str(e)) from None
            if isinstance(e, RuntimeError) and "can't start new thread" in str(e):
                raise click.ClickException("could not start another thread: the system's limit on threads or "
                                           "processes is reached (ulimit -u, the cgroup's pids.max); try fewer "
                                           "--threads or torchrun ranks") from None
            raise click.ClickException(f"internal error: {type(e).__name__}: {e} "
                                       "(run with --debug for the traceback)") from None
        finally:
            distributed.shutdown()
            if os.environ.get("FP8NORM_REPORT_PEAK_RSS"):
                _report_peak_rss()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fp8norm")
@click.option("--debug", is_flag=True, envvar="FP8NORM_DEBUG", help="Show tracebacks instead of one-line errors.")
def main(debug):
    """fp8norm: FP8 block-scaled checkpoints of large language models.

    \b
    Examples:
      fp8norm make-example /tmp/tiny-bf16
      fp8norm plan /tmp/tiny-bf16
      fp8norm quantize /tmp/tiny-bf16 /tmp/tiny-fp8
      fp8norm verify /tmp/tiny-bf16 /tmp/tiny-fp8
      fp8norm convert /tmp/tiny-fp8 /tmp/tiny-nvfp4 --to nvfp4
      fp8norm make-example /tmp/tiny-qwen3-moe --family qwen3-moe
      fp8norm shard /tmp/tiny-qwen3-moe /tmp/tiny-mcore --layout mcore --pp 2
      torchrun --nproc-per-node 8 -m fp8norm quantize SRC DST
    """


def _parse_shape(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected e.g. 300x700 or 3x200x130") from None
    if len(shape) not in (2, 3) or min(shape) <= 0:
        raise click.BadParameter(f"{value!r}: expected 2 or 3 positive sizes, e.g. 300x700 or 3x200x130")
    return shape


@main.command(short_help="Run the kernels and their torch twins on a random tensor.")
@click.option("--shape", default="3x200x130", show_default=True, callback=_parse_shape,
              help="MxN or ExMxN (stacked experts).")
@click.option("--scale-fmt", type=click.Choice(["float", "ue8m0"]), default="float", show_default=True)
@click.option("--torch-only", is_flag=True, help="Skip the Triton kernel (it runs in the slow interpreter on CPU).")
def demo(shape, scale_fmt, torch_only):
    """Quantize a random bf16 tensor with the Triton kernel and its torch twin, and check both.

    \b
    Example:
      fp8norm demo --shape 3x200x130 --scale-fmt ue8m0
    """
    from .demo import kernel_demo

    backends = ("torch",) if torch_only else ("torch", "triton")
    r = kernel_demo(shape, scale_fmt, backends=backends)
    click.echo(f"input      bf16 {'x'.join(map(str, r.shape))} -> e4m3 + scale_inv "
               f"{'x'.join(map(str, r.scale_inv_shape))} ({r.scale_fmt} scales, 128x128 blocks)")
    click.echo(f"backends   {', '.join(r.backends)}: {'bit-exact' if r.bit_exact else 'MISMATCH'}")
    click.echo(f"round trip max relative error {r.max_rel_error:.4f} (bound 2^-4 = 0.0625)")
    if not r.bit_exact or r.max_rel_error > 2.0 ** -4:
        raise SystemExit(1)


def _report_peak_rss() -> None:
    """FP8NORM_REPORT_PEAK_RSS=1: each process (each torchrun rank) prints its peak RSS at exit,
    for sizing machines."""
    try:
        with open("/proc/self/status") as f:
            hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
        click.echo(f"peak RSS rank {os.environ.get('RANK', '0')}: {int(hwm) / 1024:.0f} MiB", err=True)
    except (OSError, StopIteration):
        pass


def _interrupted_lines(ctx, e: KeyboardInterrupt) -> list[str]:
    """What a Ctrl-C left in DST and the command line that goes on from there."""
    if ctx.meta.get("fp8norm.reported"):
        return ["Interrupted after the output was complete: nothing to continue."]
    argv = ctx.meta.get("fp8norm.argv", [])
    prog = ctx.info_name or "fp8norm"  # as started: fp8norm, or python -m fp8norm
    continued = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    # fp8norm.engine.Interrupted says what DST holds (not imported here: a Ctrl-C may land mid-import)
    holds = getattr(e, "holds", None)
    if holds is None:
        return ["Interrupted before anything was written to the output directory.",
                f"Run again: {prog} {shlex.join(argv)}"]
    if e.next_step is None:
        return [f"Interrupted: {holds}."]
    run = f"Continue with: {prog} {shlex.join(continued)}" if e.next_step == "resume" else \
        f"Run again: {prog} {shlex.join(argv)}"
    return [f"Interrupted: {holds}.", run]


def _report(summary, dst) -> None:
    """Print a run's summary (under torchrun only rank 0 speaks), what its verification checked and the
    next step; exit EXIT_VERIFY_FAILED (3) when the run's own verification FAILed (the output stays,
    marked in fp8norm.json)."""
    ctx = click.get_current_context()
    ctx.meta["fp8norm.reported"] = True  # DST is complete: a Ctrl-C from here on leaves nothing to continue
    if os.environ.get("RANK", "0") != "0":
        return
    click.echo(summary.format())
    choice = ctx.meta.get("fp8norm.threads")
    if choice is not None and str(getattr(summary, "device", "cpu")).startswith("cpu"):
        click.echo(f"threads   {choice.describe()}")
    report = getattr(summary, "verify", None)
    if report is not None:
        click.echo(report.format())
    click.echo(f"wrote     {dst}")
    source = getattr(summary, "source", None)  # quantize, convert and repack (RunSummary)
    if report is not None and report.status == "FAIL":
        from .verify import EXIT_VERIFY_FAILED

        click.echo(f"exit code {EXIT_VERIFY_FAILED}: the output failed its verification (marked in "
                   f"{dst}/fp8norm.json)", err=True)
        raise SystemExit(EXIT_VERIFY_FAILED)
    if report is None and source is not None:
        click.echo(f"verify    {_nothing_checked(ctx.params, source, dst)}")
    _check_all_hint(report, source, dst)
    if ctx.info_name in ("quantize", "convert"):
        click.echo(f"load      {_load_hint(dst, ctx.params.get('to'))}")


def _nothing_checked(params: dict, src, dst) -> str:
    """Why a quantize / convert / repack run checked no tensor, and how to check when it could have."""
    for flag, given in (("--skip-verify", params.get("skip_verify")),
                        ("--verify-samples 0", params.get("verify_samples") == 0)):
        if given:
            return f"nothing checked ({flag}); to check: fp8norm verify {shlex.join([str(src), str(dst)])}"
    return "nothing checked: no tensor was rounded anew (only those are compared with the source)"


def _check_all_hint(report, src, quant, err: bool = False) -> None:
    """After a verification that checked some of the FP8 tensors (or none): the command that checks all."""
    if report is not None and src is not None and len(report.checks) < report.fp8_tensors:
        click.echo(f"check all fp8norm verify {shlex.join([str(src), str(quant)])} --all", err=err)


def _load_hint(dst, convert_to: str | None) -> str:
    """One line that loads the output (README, "Load the output"): every output of quantize and convert is
    a Hugging Face checkpoint whose config says how it is quantized."""
    path = shlex.quote(str(dst))
    if convert_to and (note := formats.get(convert_to).serve_note):
        return f"vllm serve {path}   ({note})"
    return f'vllm serve {path}   (transformers: AutoModelForCausalLM.from_pretrained("{dst}"))'


def _size(_ctx, _param, value):
    from .sizes import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


THREADS_TO_APPLY = "fp8norm.threads-to-apply"


def threads_option(io_threads: int = 2, torch_pool: bool = True):
    """--threads N, applied to torch's intra-op pool when the command starts (Command.invoke: after
    the source's read-ahead has started, since applying it imports torch; see fp8norm.threads for the
    default; `torch_pool` False: the command never imports torch). The bounds are checked while parsing."""
    def remember(ctx, param, value):
        ctx.meta[THREADS_TO_APPLY] = (param, value, io_threads, torch_pool)
        return value

    return click.option("--threads", type=click.IntRange(1, os.cpu_count() or 1), default=None, expose_value=False,
                        callback=remember,
                        help="CPU threads for torch, in one compute worker [default: two workers sharing the "
                             "CPUs this process may use (affinity, cgroup quota), per torchrun rank, less one for "
                             "the reader and writer].")


def _not_with(other: str):
    """A flag that may not be given together with the flag `other` (checked whichever comes first)."""
    def check(ctx, param, value):
        if value and ctx.params.get(other):
            raise click.UsageError(f"--{param.name} and --{other} exclude each other: --resume continues DST, "
                                   "--overwrite replaces it")
        return value
    return check


DEVICE_VALUE = re.compile(r"auto|cpu(:\d+)?|cuda(:\d+)?")  # what torch.device takes of these two


def _device(_ctx, _param, value: str) -> str:
    # read off the string: importing torch here would put its 1.5 s before the source's read-ahead
    if not DEVICE_VALUE.fullmatch(value):
        raise click.BadParameter(f"{value!r}: expected auto, cpu, cuda or cuda:N")
    return value


def _positive_finite(_ctx, _param, value):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value!r}: expected a finite number > 0")
    return value


def _percentage(_ctx, _param, value):
    if not 0 < value <= 100:  # (NaN fails too)
        raise click.BadParameter(f"{value!r}: expected a number in (0, 100]")
    return value


def _patterns(_ctx, param, value):
    import re

    for p in value:
        try:
            re.compile(p)
        except re.error as e:
            raise click.BadParameter(f"{p!r} is not a regular expression ({e})") from None
    return value


# Options several commands share.
OVERWRITE = click.option("--overwrite", is_flag=True, callback=_not_with("resume"),
                         help="Replace an existing non-empty DST (removed only once the new run is ready to write).")
THREADS = threads_option()
COPY_THREADS = threads_option(torch_pool=False)  # repack: tensors copied as they are, no torch
QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
RESUME = click.option("--resume", is_flag=True, callback=_not_with("overwrite"),
                      help="Continue an interrupted run into DST (finished shards are skipped).")
DEVICE = click.option("--device", default="auto", show_default=True, callback=_device,
                      help="auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N.")
VERIFY_SAMPLES = click.option("--verify-samples", type=click.IntRange(min=0), default=5, show_default=True,
                              help="Newly rounded tensors per shard re-read from disk and checked against the "
                                   "source.")
AMAX_FLOOR = click.option("--amax-floor", type=float, default=None, callback=_positive_finite,
                          help="Smallest tile amax (a finite number > 0) [default: 1e-4].")
AMAX_EPSILON = renamed("--amax-epsilon", "--amax-floor", "amax_floor", type=float, check=_positive_finite)


def scale_fmt_option(help_text: str):
    return click.option("--scale-fmt", type=click.Choice(["float", "ue8m0"]), default=None, help=help_text)


def json_option(what: str):
    """--json FILE (`-` or no value: standard output): one meaning in every command."""
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), is_flag=False,
                        flag_value="-", default=None, metavar="FILE",
                        help=f"Write {what} as JSON to FILE (--json alone or --json -: standard output).")

SKIP_VERIFY = click.option("--skip-verify", is_flag=True, help="No verification after writing.")
REVISION = click.option("--revision", default=None, metavar="R",
                        help="With a Hub model id as SRC: its branch, tag or commit [default: main].")
MAX_SHARD_SIZE = click.option("--max-shard-size", default="4GB", show_default=True, callback=_size,
                              help="Largest output shard: 4GB, 500MB, 4GiB.")


def run_options(f=None, *, threads=THREADS):
    """--resume, --overwrite, --threads (`threads`: that option) and --quiet: every command that writes
    a DST."""
    if f is None:
        return lambda g: run_options(g, threads=threads)
    for option in (QUIET, threads, OVERWRITE, RESUME):
        f = option(f)
    return f


# The MX scale rules and their SQNR (benchmarks/test_bench_schemes.py::test_mx_rule_sqnr; README "Formats").
MX_RULES = {
    "rceil": "smallest power of two that clips nothing (NVIDIA cvt.rp, Triton downcast_to_mxfp, gpt-oss): "
             "MXFP8 31.5 dB heavy-tailed / 31.5 Gaussian, MXFP4 16.3 / 18.5",
    "ocp": "the OCP spec's floor, clips block maxima: MXFP8 28.2 / 30.7, MXFP4 16.0 / 18.9",
    "ct": "llm-compressor's bytes, clips MXFP4 maxima: MXFP8 31.5 / 31.5, MXFP4 16.7 / 19.0",
}
MX_RULE = click.option("--mx-rule", type=click.Choice(list(MX_RULES)), default=None,
                       help="mxfp8/mxfp4: how each block's E8M0 scale is chosen [default: rceil]; SQNR on "
                            "heavy-tailed / Gaussian weights: " + "; ".join(f"{k}: {v}" for k, v in MX_RULES.items())
                            + " (dB).")


def requant_options(f):
    f = renamed("--pow2-scales", "--scale-fmt", "scale_fmt", value="ue8m0", is_flag=True)(f)
    f = scale_fmt_option("Requant: ue8m0 = power-of-two scales (TE force_pow_2_scales) [default: float, or "
                         "ue8m0 where the source's scales are E8M0].")(f)
    f = AMAX_EPSILON(f)
    f = AMAX_FLOOR(f)
    return click.option("--requant", is_flag=True,
                        help="Dequantize and requantize FP8 tensors whose split is not on the block grid.")(f)


def selection_options(f):
    """Options shared by `plan` and `quantize` (they must build the same plan)."""
    f = click.option("--allow-mismatch", is_flag=True,
                     help="With --reference: go on when tensor names differ between source and reference.")(f)
    f = click.option("--exclude", multiple=True, metavar="REGEX", callback=_patterns,
                     help="Keep tensors whose name matches (wins over everything). Repeatable.")(f)
    f = click.option("--include", multiple=True, metavar="REGEX", callback=_patterns,
                     help="Quantize tensors whose name matches (wins over rules and reference). Repeatable.")(f)
    f = click.option("--reference", metavar="REF",
                     help="An FP8 checkpoint (dir, index json or Hub model id): quantize exactly the tensors it "
                          "has scales for, with its block size, scale format and dtype.")(f)
    f = REVISION(f)
    f = click.option("--scale-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
                     help="Stored scale dtype [default: float32, or the reference's].")(f)
    f = scale_fmt_option("ue8m0: power-of-two scales for Blackwell/DeepGEMM [default: float, or the "
                         "reference's].")(f)
    f = AMAX_EPSILON(f)
    f = AMAX_FLOOR(f)
    f = MX_RULE(f)
    f = renamed("--scheme", "--to", "to", type=Choices(QUANTIZE_FORMATS, FORMAT_ALIASES))(f)
    f = click.option("--to", type=Choices(QUANTIZE_FORMATS, FORMAT_ALIASES), default="fp8", show_default=True,
                     help="fp8: block FP8, 128x128 scales (DeepSeek layout); fp8-channel: one scale per row "
                          "(compressed-tensors FP8_DYNAMIC); mxfp8/mxfp4: OCP MX, E8M0 scale per 32 "
                          "(compressed-tensors). The names `convert --to` uses.")(f)
    f = MAX_SHARD_SIZE(f)
    f = click.option("--no-repack", "no_repack", is_flag=True,
                     help="Keep the source's shard files (non-standard names are always repacked).")(f)
    f = click.option("--activation-stats", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="JSON from `fp8norm collect-stats`: weights rms and mse by input-channel activity.")(f)
    f = click.option("--mse-grid", type=click.IntRange(min=1), default=50, show_default=True,
                     help="mse: clipping factors tried per tile (1 down to 1/2).")(f)
    f = click.option("--percentile", type=float, default=99.9, show_default=True, callback=_percentage,
                     help="percentile: clip each tile at this percentile of |x|.")(f)
    f = click.option("--rms-factor", type=float, default=3.0, show_default=True, callback=_positive_finite,
                     help="rms: threshold = k * rms(tile).")(f)
    f = click.option("--calib", type=click.Choice(list(CALIB_COSTS)), default="max", show_default=True,
                     help="How each tile's scale is chosen; SQNR on realistic (heavy-tailed, outlier-channel) "
                          "weights, 1024x2048: " + "; ".join(f"{k}: {v}" for k, v in CALIB_COSTS.items())
                          + ". verify FAILs (exit 3) below 20 dB.")(f)
    return f


# The format names every command uses (`quantize --to`, `convert --to`), from the format registry;
# old spellings still work.
QUANTIZE_FORMATS = sorted(formats.cli_choices("quantize"))
CONVERT_FORMATS = sorted(formats.cli_choices("convert"))
FORMAT_ALIASES = formats.cli_aliases()

# What each --calib mode costs (benchmarks/test_bench_calibrate.py, README "Calibration and verification").
CALIB_COSTS = {
    "max": "31.6-32.0 dB, e4m3's floor, no clipping (bit-compatible with official releases and DeepGEMM)",
    "rms": "3.4 dB: clips outlier channels flat, not for real checkpoints",
    "percentile": "12.3 dB: clips outlier channels, not for real checkpoints",
    "mse": "32.2 dB, never below max, about 150x slower",
}


def _source(src: str, revision: str | None = None) -> str:
    """SRC (or --reference) as a local directory: a local path as it is, a Hub model id (org/name) as its
    snapshot in huggingface_hub's cache (fetched if needed)."""
    from .hub import resolve

    return str(resolve(src, revision))


def _plan_options(kw):
    """The selection options of `plan` / `quantize` as the library's PlanOptions."""
    from dataclasses import fields

    from .plan import PlanOptions

    kw = {**kw, "reference": kw["reference"] and _source(kw["reference"]), "scheme": formats.library_scheme(kw["to"])}
    return PlanOptions(**{f.name: kw[f.name] for f in fields(PlanOptions) if f.name in kw}, repack=not kw["no_repack"])


@main.command("plan", short_help="Show what quantize would do to each tensor, and why.")
@click.argument("src")
@selection_options
@json_option("the plan")
def plan_cmd(src, json_path, **kw):
    """Show what `quantize` would do to every tensor of SRC, and why; writes nothing.

    \b
    Example:
      fp8norm plan /models/Qwen3-8B --json plan.json
    """
    from .plan import format_plan_table
    from .quantize import plan

    p = plan(_source(src, kw["revision"]), _plan_options(kw))
    if json_path is None:
        click.echo(format_plan_table(p))
    else:
        _write_json(p.to_dict(), json_path)


@main.command("quantize", short_help="Quantize a bf16/fp16 checkpoint (block FP8 by default).")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@selection_options
@DEVICE
@VERIFY_SAMPLES
@SKIP_VERIFY
@click.option("--allow-nonfinite", is_flag=True,
              help="Keep tensors holding NaN/Inf unquantized (reported) instead of stopping.")
@run_options
def quantize_cmd(src, dst, device, resume, overwrite, quiet, verify_samples, skip_verify, allow_nonfinite, **kw):
    """Quantize the bf16/fp16 checkpoint SRC into an FP8 block-scaled checkpoint DST.

    Re-reads --verify-samples FP8 tensors per shard and checks them as `fp8norm verify` does; exit
    code 3 when that verification FAILs (DST stays, marked in its fp8norm.json), 1 on an error.

    \b
    Examples:
      fp8norm quantize /models/Qwen3-8B /models/Qwen3-8B-FP8
      fp8norm quantize Qwen/Qwen3-8B Qwen3-8B-FP8                # a Hub model id (cache, HF_HUB_OFFLINE)
      fp8norm quantize SRC DST --scale-fmt ue8m0                 # B200 / DeepGEMM
      fp8norm quantize SRC DST --to mxfp4                        # the formats of `convert --to`
      fp8norm quantize SRC DST --reference /models/Qwen3-8B-FP8  # same tensors as an official release
      fp8norm quantize SRC DST --exclude 'mlp\\.gate\\.' --resume
      fp8norm quantize SRC DST --calib mse --activation-stats stats.json
    """
    from .quantize import quantize

    summary = quantize(_source(src, kw["revision"]), dst, device=device, resume=resume, overwrite=overwrite,
                       progress=None if not quiet else False,
                       verify_samples=0 if skip_verify else verify_samples, allow_nonfinite=allow_nonfinite,
                       options=_plan_options(kw))
    _report(summary, dst)


@main.command("repack", short_help="Re-shard a safetensors directory; no quantization.")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@MAX_SHARD_SIZE
@run_options(threads=COPY_THREADS)
def repack_cmd(src, dst, max_shard_size, resume, overwrite, quiet):
    """Re-shard any safetensors directory SRC into standard shards and an index in DST; no quantization.

    \b
    Example:
      fp8norm repack /ckpt/engine-output /ckpt/hf --max-shard-size 5GB
    """
    from .quantize import repack

    summary = repack(src, dst, max_shard_size=max_shard_size, resume=resume, overwrite=overwrite,
                     progress=None if not quiet else False)
    _report(summary, dst)


@main.command("convert", short_help="Convert a checkpoint to another format (--to).")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--to", "to", required=True, type=Choices(CONVERT_FORMATS, FORMAT_ALIASES),
              help="Target format (listed above).")
@scale_fmt_option("With --to fp8: ue8m0 = power-of-two scales for B200/DeepGEMM (relabel or one-pass requant) "
                  "[default: float].")
@click.option("--keep-unaligned", is_flag=True,
              help="NVFP4: keep weights whose input dim is not a multiple of 16 as they are (else an error).")
@MX_RULE
@MAX_SHARD_SIZE
@click.option("--no-repack", "no_repack", is_flag=True, help="Keep the source's shard files.")
@REVISION
@DEVICE
@VERIFY_SAMPLES
@SKIP_VERIFY
@run_options
def convert_cmd(src, dst, to, scale_fmt, keep_unaligned, mx_rule, max_shard_size, no_repack, revision, device, resume,
                overwrite, verify_samples, skip_verify, quiet):
    """Convert checkpoint SRC to another format in DST, streaming shard by shard.

    Requantized tensors (fp8 --scale-fmt ue8m0 from float scales; fp8-channel, mxfp8, mxfp4) are re-read after
    writing and checked as `fp8norm verify` does; exit code 3 when that check FAILs (the output stays,
    marked in DST/fp8norm.json).

    \b
    Targets:
      bf16, fp16   dequantize FP8 block weights (quantization_config removed)
      fp8          block FP8, DeepSeek/transformers layout (from compressed-tensors FP8);
                   --scale-fmt ue8m0: power-of-two scales for B200/DeepGEMM
      fp8-ct       block FP8 in the compressed-tensors layout
      nvfp4        NVFP4, ModelOpt layout (hf_quant_config.json)
      nvfp4-ct     NVFP4, compressed-tensors nvfp4-pack-quantized
      fp8-channel  FP8, one scale per row (compressed-tensors FP8_DYNAMIC)
      mxfp8, mxfp4 OCP MX, E8M0 scale per 32 (compressed-tensors); from bf16 or FP8
    \b
    Examples:
      fp8norm convert /models/DeepSeek-V3 /models/DeepSeek-V3-bf16 --to bf16
      fp8norm convert /models/Qwen3-8B-FP8 /models/Qwen3-8B-NVFP4 --to nvfp4-ct
    """
    from .convert import convert

    summary = convert(_source(src, revision), dst, to=to, scale_fmt=scale_fmt, keep_unaligned=keep_unaligned,
                      max_shard_size=max_shard_size, mx_rule=mx_rule,
                      repack=not no_repack, device=device, resume=resume, overwrite=overwrite,
                      progress=None if not quiet else False, verify_samples=0 if skip_verify else verify_samples)
    _report(summary, dst)


@main.command("shard", short_help="Split a checkpoint into model-parallel rank files.")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--layout", type=click.Choice(["deepseek", "mcore"]), required=True,
              help="deepseek: model{i}-mp{N}.safetensors; mcore: Megatron-Core TP/PP/EP rank folders.")
@click.option("--mp", type=click.IntRange(min=1), help="deepseek: model-parallel size N.")
@click.option("--n-experts", type=click.IntRange(min=0), default=None,
              help="deepseek: routed experts in the model [default: config.json's n_routed_experts / num_experts].")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, help="mcore: tensor-parallel size.")
@click.option("--pp", type=click.IntRange(min=1), default=1, show_default=True, help="mcore: pipeline-parallel size.")
@click.option("--ep", type=click.IntRange(min=1), default=1, show_default=True, help="mcore: expert-parallel size.")
@click.option("--pipeline-layers", default=None, metavar="8,7,...", help="mcore: layers per pipeline stage.")
@click.option("--grouped-gemm", is_flag=True, help="mcore: experts.linear_fc1.weightK naming.")
@requant_options
@run_options
def shard_cmd(src, dst, layout, mp, n_experts, tp, pp, ep, pipeline_layers, grouped_gemm, requant, amax_floor,
              scale_fmt, resume, overwrite, quiet):
    """Split checkpoint SRC into one file per model-parallel rank in DST (streaming, one module at a time).

    SRC may be bf16/fp16, block FP8 (either layout), fp8-channel, mxfp8, mxfp4 or GPTQ W4A16 (deepseek);
    scales are cut with their weights.

    \b
    Examples:
      fp8norm shard /models/DeepSeek-V3-W4A16 /ckpt/mp8 --layout deepseek --mp 8 --n-experts 256
      fp8norm shard /models/Qwen3-30B-A3B /ckpt/mcore --layout mcore --tp 2 --pp 2 --ep 4 --grouped-gemm
      fp8norm shard /ckpt/qwen3-mxfp4 /ckpt/mcore-mx --layout mcore --tp 4
    """
    progress = None if not quiet else False
    wrong = ([("--mp", mp), ("--n-experts", n_experts)] if layout == "mcore" else
             [("--tp", tp != 1), ("--pp", pp != 1), ("--ep", ep != 1), ("--pipeline-layers", pipeline_layers),
              ("--grouped-gemm", grouped_gemm)])
    wrong = [opt for opt, given in wrong if given]
    if wrong:
        other = "--tp/--pp/--ep" if layout == "mcore" else "--mp/--n-experts"
        raise click.BadParameter(f"{', '.join(wrong)} does not apply to --layout {layout} (it takes {other})",
                                 param_hint=wrong[0])
    if layout == "deepseek":
        from .shard import shard_deepseek

        if not mp:
            raise click.BadParameter("--layout deepseek needs --mp N", param_hint="--mp")
        summary = shard_deepseek(src, dst, mp=mp, n_experts=n_experts, requant=requant, amax_floor=amax_floor,
                                 scale_fmt=scale_fmt, overwrite=overwrite, progress=progress, resume=resume)
    else:
        from .shard import hf_to_mcore

        summary = hf_to_mcore(src, dst, tp=tp, pp=pp, ep=ep, pipeline_layers=pipeline_layers,
                              grouped_gemm=grouped_gemm, requant=requant, amax_floor=amax_floor,
                              scale_fmt=scale_fmt, overwrite=overwrite, progress=progress, resume=resume)
    _report(summary, dst)


@main.command("unshard", short_help="Join a Megatron-Core checkpoint back into HF layout.")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@requant_options
@MAX_SHARD_SIZE
@click.option("--trust-rank-files", is_flag=True,
              help="Skip checking each rank file against the sha256 the shard run recorded in SRC's "
                   "fp8norm-manifest.json (for rank files made or edited elsewhere: a damaged one is then "
                   "joined as it is).")
@run_options
def unshard_cmd(src, dst, requant, amax_floor, scale_fmt, max_shard_size, trust_rank_files, resume, overwrite,
                quiet):
    """Join a Megatron-Core checkpoint written by `fp8norm shard --layout mcore` back into HF layout.

    \b
    Example:
      fp8norm unshard /ckpt/mcore /models/Qwen3-30B-A3B-again
    """
    from .shard import mcore_to_hf

    summary = mcore_to_hf(src, dst, requant=requant, amax_floor=amax_floor, scale_fmt=scale_fmt,
                          max_shard_size=max_shard_size, overwrite=overwrite, progress=None if not quiet else False,
                          resume=resume, check_rank_files=not trust_rank_files)
    _report(summary, dst)


@main.command("verify", short_help="Check a quantized checkpoint against its source.")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("quant", type=click.Path(exists=True, file_okay=False))
@click.option("--verify-samples", type=click.IntRange(min=0), default=5, show_default=True,
              help="Quantized tensors checked per shard.")
@renamed("--samples", "--verify-samples", "verify_samples", type=click.IntRange(min=0))
@click.option("--all", "check_all", is_flag=True, help="Check every quantized tensor.")
@json_option("the report (the text report then goes to standard error)")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Draw SQNR per layer and tensor kind (needs matplotlib: the `plot` extra).")
@click.option("--sqnr-bands", default=None, metavar="GOOD,WARN",
              help="SQNR lower bounds in dB [default: 29.5,20, from e4m3's 31.5 dB floor].")
@click.option("--cos-bands", default=None, metavar="GOOD,WARN", help="Also judge cosine (absolute lower bounds).")
@click.option("--mae-bands", default=None, metavar="GOOD,WARN", help="Also judge mean abs error (absolute upper bounds).")
@click.option("--maxae-bands", default=None, metavar="GOOD,WARN", help="Also judge max abs error (absolute upper bounds).")
def verify_cmd(src, quant, verify_samples, check_all, json_path, plot_path, sqnr_bands, cos_bands, mae_bands,
               maxae_bands):
    """Check that the FP8 checkpoint QUANT is a correct quantization of SRC and what FP8 costs on it.

    Every element checked must be the round-to-nearest-even e4m3 value of x / scale (else FAIL,
    the tensor named); the cost is measured scale-free (SQNR, relative RMS error, cosine, clipped
    and flushed elements) against e4m3's own floor (SQNR 31.5 dB). Also checks scales, kept
    tensors, index and config. Exit code 3 on any FAIL (1: an error).

    \b
    Example:
      fp8norm verify /models/Qwen3-8B /models/Qwen3-8B-FP8 --all --json report.json --plot report.png
    """
    from .verify import EXIT_VERIFY_FAILED, FAIL, verify
    from .verify_plot import plot_report, require_matplotlib

    if plot_path:
        require_matplotlib()  # before the work, not after it

    overrides = {k: v for k, v in (("cos", _two(cos_bands, "--cos-bands")), ("mae", _two(mae_bands, "--mae-bands")),
                                   ("maxae", _two(maxae_bands, "--maxae-bands"))) if v is not None}
    if sqnr_bands is not None:
        overrides["sqnr_good"], overrides["sqnr_warn"] = _two(sqnr_bands, "--sqnr-bands")
    report = verify(src, quant, samples=None if check_all else verify_samples, band_overrides=overrides)
    click.echo(report.format(), err=json_path == "-")
    _check_all_hint(report, src, quant, err=json_path == "-")
    if json_path is not None:
        _write_json(report.to_dict(), json_path)
    if plot_path:
        click.echo(f"plot      {plot_report(report, plot_path)}")
    if report.status == FAIL:
        raise SystemExit(EXIT_VERIFY_FAILED)


def _write_json(doc, path: str) -> None:
    import json

    text = json.dumps(doc, indent=1)
    if path == "-":
        click.echo(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def _two(text: str | None, opt: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected two numbers, e.g. 29.5,20", param_hint=opt) from None
    return a, b


@main.command("collect-stats", short_help="Per-input-channel activation statistics (for --calib).")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Text file, one prompt per line.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Where to write the stats JSON.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per prompt at most.")
@DEVICE
def collect_stats_cmd(model_dir, prompts, out, max_tokens, device):
    """Collect per-input-channel activation statistics of MODEL_DIR (a bf16 transformers model).

    \b
    Example:
      fp8norm collect-stats /models/Qwen3-8B --prompts prompts.txt --out stats.json
      fp8norm quantize /models/Qwen3-8B /models/Qwen3-8B-FP8 --calib mse --activation-stats stats.json
    """
    from .activation_stats import collect_activation_stats

    lines = [line.strip() for line in open(prompts) if line.strip()]
    doc = collect_activation_stats(model_dir, lines, max_tokens=max_tokens, device=device)
    _write_json(doc, out)
    click.echo(f"wrote stats of {len(doc['modules'])} linear modules over {doc['tokens']} tokens to {out}")


@main.command("make-example", short_help="Write a tiny synthetic bf16 checkpoint.")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--family", type=click.Choice(["llama", "qwen3-moe", "qwen3.5-moe", "deepseek-v3"]),
              default="qwen3.5-moe", show_default=True)
@click.option("--layout", type=click.Choice(["sharded", "single", "engine"]), default="sharded",
              show_default=True, help="engine: odd shard names and no index, as training engines write.")
@OVERWRITE
def make_example_cmd(dst, family, layout, overwrite):
    """Write a tiny synthetic bf16 checkpoint with the real tensor names of FAMILY into DST.

    \b
    Example:
      fp8norm make-example /tmp/tiny-bf16 --family deepseek-v3
    """
    from .examples import make_example

    make_example(dst, family, layout, overwrite=overwrite)
    click.echo(f"wrote a tiny {family} checkpoint ({layout}) to {dst}")




def run() -> None:
    """The `fp8norm` console script and `python -m fp8norm`: main(), then, where the command loaded
    torch, an exit that skips the interpreter's teardown of torch's modules (0.35 s of a 4 s quantize
    here). By then every output file is on disk and fsynced, the lock is released and a torchrun
    process group destroyed (_Group.invoke); stdout and stderr are flushed first. A traceback (--debug)
    leaves the ordinary way, and so does a run under a profiler or tracer (cProfile, coverage: they
    write their results at exit)."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if "torch" not in sys.modules or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
