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
      fp8norm demo
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


if __name__ == "__main__":
    main()
