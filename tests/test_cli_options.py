"""Every option of every command reaches the library call, and the renamed options still work.

The first test is generated from the live click commands: for each command, the library functions
it calls are replaced by recorders; each visible option is given a value other than its default and
the recorded calls must differ from those of the bare command. A new option that the command body
forgets to pass on fails here."""

import importlib
import json
from unittest import mock

import click
import pytest
from click.testing import CliRunner

from fp8norm import cli as fp8cli

# What each command calls (module, attribute); every call is recorded with its arguments.
LIBRARY = {
    "plan": [("fp8norm.quantize", "plan"), ("fp8norm.plan", "format_plan_table")],
    "quantize": [("fp8norm.quantize", "quantize")],
    "repack": [("fp8norm.quantize", "repack")],
    "convert": [("fp8norm.convert", "convert")],
    "shard": [("fp8norm.shard", "shard_deepseek"), ("fp8norm.shard", "hf_to_mcore")],
    "unshard": [("fp8norm.shard", "mcore_to_hf")],
    "verify": [("fp8norm.verify", "verify"), ("fp8norm.verify_plot", "plot_report"), ("fp8norm.verify_plot", "require_matplotlib")],
    "collect-stats": [("fp8norm.activation_stats", "collect_activation_stats")],
    "make-example": [("fp8norm.examples", "make_example")],
    "demo": [("fp8norm.demo", "kernel_demo")],
}
# Options whose effect is not an argument of the library call, and where it is tested instead.
ELSEWHERE = {
    "--threads": "applied to torch's intra-op pool while parsing (tests/test_threads.py)",
}
# Options whose effect is which library function runs (checked by the other options' cases).
CHOOSES_THE_CALL = {("shard", "--layout"): "deepseek calls shard_deepseek (the --mp case), mcore hf_to_mcore"}
# The bare command lines of each command ({d}: a scratch folder; one per path through the command: each
# option must reach the call on every path that accepts it), and values for options that need one.
BARE = {
    "plan": [["SRC"]], "quantize": [["SRC", "{d}/out"]], "repack": [["{d}", "{d}/out"]],
    "convert": [["SRC", "{d}/out", "--to", "fp8"]],
    "shard": [["{d}", "{d}/out", "--layout", "mcore"], ["{d}", "{d}/out", "--layout", "deepseek", "--mp", "1"]],
    "unshard": [["{d}", "{d}/out"]], "verify": [["{d}", "{d}"]],
    "collect-stats": [["{d}", "--prompts", "{d}/prompts.txt", "--out", "{d}/stats.json"]],
    "make-example": [["{d}/out"]], "demo": [[]],
}
VALUES = {
    "--activation-stats": "{d}/stats.json", "--prompts": "{d}/prompts2.txt", "--out": "{d}/other.json",
    "--max-shard-size": "1MB", "--device": "cpu", "--shape": "2x300x200", "--pipeline-layers": "1,1",
    "--include": "lm_head", "--exclude": "lm_head", "--reference": "REF", "--revision": "v1",
    "--sqnr-bands": "25,15", "--cos-bands": "0.99,0.9", "--mae-bands": "0.1,0.2", "--maxae-bands": "1,2",
    "--plot": "{d}/p.png", "--json": "{d}/r.json", "--calib": "mse",
}
# options that only apply with another one (the command refuses them alone)
WITH = {("quantize", "--activation-stats"): ["--calib", "mse"], ("plan", "--activation-stats"): ["--calib", "mse"]}


def other_value(cmd: str, param: click.Option, d) -> list[str]:
    name = param.opts[0]
    if param.is_flag:
        return [name]
    if name in VALUES:
        return [name, VALUES[name].format(d=d)]
    if isinstance(param.type, click.Choice):
        return [name, next(c for c in param.type.choices if c != param.default)]
    default = param.default if isinstance(param.default, (int, float)) and not isinstance(param.default, bool) else None
    if isinstance(param.type, (click.types.IntParamType, click.IntRange)):
        return [name, str((default or 1) + 1)]
    if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
        return [name, str((default or 1e-3) * 0.5)]
    raise AssertionError(f"{cmd} {name}: add a value to VALUES")


def recorded_calls(cmd: str, args: list[str], refused_ok: bool = False) -> list | None:
    """The library calls `fp8norm CMD ARGS` makes (None: the command line was refused, with refused_ok)."""
    calls = []

    def recorder(module, attr, result=lambda *a: mock.MagicMock(status="GOOD", checks=[], fp8_tensors=0)):
        def record(*a, **kw):
            calls.append((module, attr, repr(a), repr(sorted(kw.items()))))
            return result(*a)
        return record

    patches = [mock.patch(f"{m}.{a}", recorder(m, a)) for m, a in LIBRARY[cmd]
               if hasattr(importlib.import_module(m), a)]
    patches += [mock.patch("fp8norm.hub.resolve", recorder("fp8norm.hub", "resolve", lambda src, *a: str(src))),
                mock.patch.object(fp8cli, "_report", lambda *a: None),
                mock.patch.object(fp8cli, "_write_json", recorder("fp8norm.cli", "_write_json"))]
    for p in patches:
        p.start()
    try:
        res = CliRunner().invoke(fp8cli.main, [cmd, *args])
    finally:
        for p in patches:
            p.stop()
    if refused_ok and res.exit_code == 2:
        return None
    assert res.exit_code in (0, 1) and "Usage:" not in res.output, (cmd, args, res.output)
    assert calls, (cmd, args, res.output)
    return calls


def visible_options(command: click.Command):
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden and p.expose_value
            and p.name != "help"]


@pytest.mark.parametrize("cmd", sorted(fp8cli.main.commands))
def test_every_option_reaches_the_library_call(cmd, tmp_path):
    d = tmp_path
    (d / "prompts.txt").write_text("hello\n")
    (d / "prompts2.txt").write_text("other\n")
    (d / "stats.json").write_text(json.dumps({"modules": {}, "tokens": 1}))
    assert cmd in LIBRARY and cmd in BARE, f"new command {cmd}: add it to LIBRARY and BARE"
    command = fp8cli.main.commands[cmd]
    hidden_effects = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.expose_value
                      and not p.hidden]
    assert set(hidden_effects) <= set(ELSEWHERE), f"{cmd}: {hidden_effects} take effect outside the call: say where"
    for param in visible_options(command):
        if (cmd, param.opts[0]) in CHOOSES_THE_CALL:
            continue
        accepted = 0
        for bare in BARE[cmd]:
            args = [a.format(d=d) for a in bare + WITH.get((cmd, param.opts[0]), [])]
            changed = recorded_calls(cmd, args + other_value(cmd, param, d), refused_ok=True)
            if changed is None:
                continue  # this path refuses the option (e.g. --mp with --layout mcore)
            accepted += 1
            assert changed != recorded_calls(cmd, args), \
                f"fp8norm {' '.join(bare[-2:])} {param.opts[0]}: accepted but never reaches the library call"
        assert accepted, f"{cmd} {param.opts[0]}: refused on every path"


@pytest.mark.parametrize("old,new", [
    (["quantize", "SRC", "{d}/o", "--scheme", "mxfp4"], ["quantize", "SRC", "{d}/o", "--to", "mxfp4"]),
    (["quantize", "SRC", "{d}/o", "--to", "fp8-block"], ["quantize", "SRC", "{d}/o", "--to", "fp8"]),
    (["quantize", "SRC", "{d}/o", "--amax-epsilon", "1e-5"], ["quantize", "SRC", "{d}/o", "--amax-floor", "1e-5"]),
    (["convert", "SRC", "{d}/o", "--to", "fp8-ue8m0"], ["convert", "SRC", "{d}/o", "--to", "fp8", "--scale-fmt", "ue8m0"]),
    (["shard", "{d}", "{d}/o", "--layout", "mcore", "--pow2-scales"],
     ["shard", "{d}", "{d}/o", "--layout", "mcore", "--scale-fmt", "ue8m0"]),
    (["unshard", "{d}", "{d}/o", "--amax-epsilon", "1e-6"], ["unshard", "{d}", "{d}/o", "--amax-floor", "1e-6"]),
    (["verify", "{d}", "{d}", "--samples", "2"], ["verify", "{d}", "{d}", "--verify-samples", "2"]),
    (["verify", "{d}", "{d}", "--samples", "0"], ["verify", "{d}", "{d}", "--verify-samples", "0"]),
])
def test_an_old_spelling_takes_effect_as_the_new_one_and_says_so(old, new, tmp_path):
    old = [a.format(d=tmp_path) for a in old]
    new = [a.format(d=tmp_path) for a in new]
    assert recorded_calls(old[0], old[1:]) == recorded_calls(new[0], new[1:])
    res = CliRunner().invoke(fp8cli.main, ["--help"])
    assert old[-2] not in res.output or old[-2] in new  # hidden from help
    with mock.patch.object(fp8cli, "_report", lambda *a: None):
        for m, a in LIBRARY[old[0]]:
            if hasattr(importlib.import_module(m), a):
                mock.patch(f"{m}.{a}", mock.MagicMock(status="GOOD")).start()
        try:
            res = CliRunner().invoke(fp8cli.main, old)
        finally:
            mock.patch.stopall()
    assert "is now spelled" in res.output and new[-2] in res.output.split("is now spelled")[1]


def test_an_old_and_a_new_spelling_together_are_refused(tmp_path):
    res = CliRunner().invoke(fp8cli.main, ["quantize", "SRC", str(tmp_path / "o"), "--amax-epsilon", "1e-5",
                                           "--amax-floor", "1e-4"])
    assert res.exit_code == 2
    assert "--amax-epsilon is the old spelling of --amax-floor: give only one of them" in res.output


def test_old_spellings_are_hidden_from_help():
    for cmd, hidden in [("quantize", "--scheme"), ("quantize", "--amax-epsilon"), ("shard", "--pow2-scales"),
                        ("unshard", "--amax-epsilon"), ("verify", "--samples")]:
        text = CliRunner().invoke(fp8cli.main, [cmd, "--help"]).output
        assert f"{hidden} " not in text and f"{hidden}\n" not in text, (cmd, hidden)
    assert "fp8-ue8m0" not in CliRunner().invoke(fp8cli.main, ["convert", "--help"]).output.split("Options:")[1]


@pytest.mark.parametrize("args,message", [
    (["quantize", "SRC", "DST", "--amax-floor", "inf"], "Invalid value for '--amax-floor': inf: expected a finite number > 0"),
    (["quantize", "SRC", "DST", "--amax-floor", "0"], "Invalid value for '--amax-floor': 0.0: expected a finite number > 0"),
    (["shard", "SRC", "DST", "--layout", "mcore", "--amax-floor", "nan"], "Invalid value for '--amax-floor'"),
    (["verify", "SRC", "DST", "--verify-samples", "-1"], "Invalid value for '--verify-samples'"),
    (["quantize", "SRC", "DST", "--threads", "100000"], "Invalid value for '--threads'"),
    (["collect-stats", "--max-tokens", "0", "SRC", "--prompts", "P", "--out", "O"], "Invalid value for '--max-tokens'"),
    # were checked at the first tensor (rms: "scale_inv must be finite") or while planning, naming no option
    (["quantize", "SRC", "DST", "--calib", "rms", "--rms-factor", "inf"],
     "Invalid value for '--rms-factor': inf: expected a finite number > 0"),
    (["quantize", "SRC", "DST", "--percentile", "nan"], "Invalid value for '--percentile': nan: expected a number in"),
    (["quantize", "SRC", "DST", "--percentile", "0"], "Invalid value for '--percentile'"),
    (["quantize", "SRC", "DST", "--mse-grid", "0"], "Invalid value for '--mse-grid'"),
    (["shard", "SRC", "DST", "--layout", "mcore", "--tp", "0"], "Invalid value for '--tp'"),
    (["shard", "SRC", "DST", "--layout", "mcore", "--pp", "-1"], "Invalid value for '--pp'"),
    (["shard", "SRC", "DST", "--layout", "mcore", "--ep", "0"], "Invalid value for '--ep'"),
    (["shard", "SRC", "DST", "--layout", "deepseek", "--mp", "0"], "Invalid value for '--mp'"),
    (["shard", "SRC", "DST", "--layout", "deepseek", "--mp", "2", "--n-experts", "-1"],
     "Invalid value for '--n-experts'"),
])
def test_option_values_are_checked_while_parsing(args, message, tmp_path):
    """Bad values are refused before any file is read (SRC does not even exist here)."""
    with mock.patch("fp8norm.quantize.quantize") as q:
        res = CliRunner().invoke(fp8cli.main, args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not q.called


def test_the_command_list_in_help_is_not_cut():
    res = CliRunner().invoke(fp8cli.main, ["--help"], terminal_width=80)
    listing = res.output.split("Commands:")[1]
    assert "..." not in listing
    assert len([line for line in listing.splitlines() if line.strip()]) == len(fp8cli.main.commands)


def test_help_and_version_do_not_import_torch():
    """`fp8norm --help` / `--version` must not pay torch's import (seconds): the CLI module and the
    package import nothing heavy until a command runs (benchmarks/test_bench_cli.py times it)."""
    import subprocess
    import sys

    code = ("import sys, fp8norm, fp8norm.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'triton', 'safetensors', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("mode", sorted(fp8cli.CALIB_COSTS))
def test_calibration_modes_state_their_cost_in_help(mode):
    text = " ".join(CliRunner().invoke(fp8cli.main, ["quantize", "--help"], terminal_width=200).output.split())
    assert f"{mode}: " in text and "dB" in text.split(f"{mode}: ")[1][:60]
