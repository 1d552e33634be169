"""The `fp8norm` command line: a thin layer over the library; every command is a Python function."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fp8norm")
def main():
    """fp8norm: FP8 block-scaled checkpoints of large language models.

    \b
    Examples:
      fp8norm make-example /tmp/tiny-bf16
      fp8norm plan /tmp/tiny-bf16
      fp8norm quantize /tmp/tiny-bf16 /tmp/tiny-fp8
      fp8norm demo --shape 256x384 --scale-fmt ue8m0
    """


def _parse_shape(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected e.g. 300x700 or 3x200x130") from None
    if len(shape) not in (2, 3) or min(shape) <= 0:
        raise click.BadParameter(f"{value!r}: expected 2 or 3 positive sizes, e.g. 300x700 or 3x200x130")
    return shape


@main.command()
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


def _fail(e: Exception) -> None:
    """One clear line, no traceback, non-zero exit."""
    raise click.ClickException(str(e)) from None


def _size(_ctx, _param, value):
    from .sizes import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def selection_options(f):
    """Options shared by `plan` and `quantize` (they must build the same plan)."""
    f = click.option("--allow-mismatch", is_flag=True,
                     help="With --reference: go on when tensor names differ between source and reference.")(f)
    f = click.option("--exclude", multiple=True, metavar="REGEX",
                     help="Keep tensors whose name matches (wins over everything). Repeatable.")(f)
    f = click.option("--include", multiple=True, metavar="REGEX",
                     help="Quantize tensors whose name matches (wins over rules and reference). Repeatable.")(f)
    f = click.option("--reference", type=click.Path(exists=True), metavar="REF",
                     help="An FP8 checkpoint (dir or index json): quantize exactly the tensors it has scales "
                          "for, with its block size, scale format and dtype.")(f)
    f = click.option("--scale-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
                     help="Stored scale dtype [default: float32, or the reference's].")(f)
    f = click.option("--scale-fmt", type=click.Choice(["float", "ue8m0"]), default=None,
                     help="ue8m0: power-of-two scales for Blackwell/DeepGEMM [default: float, or the "
                          "reference's].")(f)
    f = click.option("--amax-floor", type=float, default=None, help="Smallest tile amax [default: 1e-4].")(f)
    f = click.option("--max-shard-size", default="4GB", show_default=True, callback=_size,
                     help="Largest output shard: 4GB, 500MB, 4GiB.")(f)
    f = click.option("--no-repack", "no_repack", is_flag=True,
                     help="Keep the source's shard files (non-standard names are always repacked).")(f)
    return f


def _plan_kwargs(kw) -> dict:
    return dict(reference=kw["reference"], include=kw["include"], exclude=kw["exclude"],
                allow_mismatch=kw["allow_mismatch"], scale_fmt=kw["scale_fmt"], scale_dtype=kw["scale_dtype"],
                amax_floor=kw["amax_floor"], max_shard_size=kw["max_shard_size"], repack=not kw["no_repack"])


@main.command("plan")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(src, as_json, **kw):
    """Show what `quantize` would do to every tensor of SRC, and why; writes nothing.

    \b
    Example:
      fp8norm plan /models/Qwen3-8B --json > plan.json
    """
    import json

    from .plan import format_plan_table
    from .quantize import plan

    try:
        p = plan(src, **_plan_kwargs(kw))
    except ValueError as e:
        _fail(e)
    click.echo(json.dumps(p.to_dict(), indent=1) if as_json else format_plan_table(p))


@main.command("quantize")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@selection_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into DST (skips finished shards).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty DST.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def quantize_cmd(src, dst, device, resume, overwrite, quiet, **kw):
    """Quantize the bf16/fp16 checkpoint SRC into an FP8 block-scaled checkpoint DST.

    \b
    Examples:
      fp8norm quantize /models/Qwen3-8B /models/Qwen3-8B-FP8
      fp8norm quantize SRC DST --scale-fmt ue8m0                 # B200 / DeepGEMM
      fp8norm quantize SRC DST --reference /models/Qwen3-8B-FP8  # same tensors as an official release
      fp8norm quantize SRC DST --exclude 'mlp\\.gate\\.' --resume
    """
    from .quantize import quantize

    try:
        summary = quantize(src, dst, device=device, resume=resume, overwrite=overwrite,
                           progress=None if not quiet else False, **_plan_kwargs(kw))
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(summary.format())
    click.echo(f"wrote     {dst}")


@main.command("repack")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--max-shard-size", default="4GB", show_default=True, callback=_size,
              help="Largest output shard: 4GB, 500MB, 4GiB.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into DST.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty DST.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def repack_cmd(src, dst, max_shard_size, resume, overwrite, quiet):
    """Re-shard any safetensors directory SRC into standard shards and an index in DST; no quantization.

    \b
    Example:
      fp8norm repack /ckpt/engine-output /ckpt/hf --max-shard-size 5GB
    """
    from .quantize import repack

    try:
        summary = repack(src, dst, max_shard_size=max_shard_size, resume=resume, overwrite=overwrite,
                         progress=None if not quiet else False)
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(summary.format())
    click.echo(f"wrote     {dst}")


@main.command("make-example")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--family", type=click.Choice(["llama", "qwen3-moe", "qwen3.5-moe", "deepseek-v3"]),
              default="qwen3.5-moe", show_default=True)
@click.option("--layout", type=click.Choice(["sharded", "single", "engine"]), default="sharded",
              show_default=True, help="engine: odd shard names and no index, as training engines write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty DST.")
def make_example_cmd(dst, family, layout, overwrite):
    """Write a tiny synthetic bf16 checkpoint with the real tensor names of FAMILY into DST.

    \b
    Example:
      fp8norm make-example /tmp/tiny-bf16 --family deepseek-v3
    """
    from .examples import make_example

    try:
        make_example(dst, family, layout, overwrite=overwrite)
    except (ValueError, OSError) as e:
        _fail(e)
    click.echo(f"wrote a tiny {family} checkpoint ({layout}) to {dst}")


if __name__ == "__main__":
    main()
