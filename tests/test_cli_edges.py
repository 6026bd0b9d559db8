"""Every option of every subcommand, fed the edge values of its kind, read from the parsers themselves.

The walk finds each argument that takes a value (options and positionals, nested subcommands too) and feeds the
boundary values of its kind (0, negative, NaN/inf, huge, empty, a file where a folder is expected and the reverse,
an unwritable place, a non-UTF-8 text file). Each run must end in one of two ways: refused with exit 2 and one line
naming the option, or accepted and handed to the command. The commands' ``run`` functions are replaced by a stub
for the walk, so an accepted value does no work: the checks happen while the command line is parsed, before any
model or image is touched (tests/test_cli_errors.py runs real commands). An option added without one of the shared
checks of ``promptkd.cli.validate`` fails :func:`test_every_option_has_a_checked_kind` the day it is added; a count
that accepts 0 must say here what 0 means.
"""

from __future__ import annotations

import argparse
import importlib
import io
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from promptkd.cli import validate
from promptkd.cli.main import COMMANDS, build_parser, main

# Options whose 0 is accepted on purpose, each with what it means (a new count0 / non-negative option must be added
# here with its reason, or be a count that refuses 0).
ZERO_MEANS = {
    "--lanes": "one read lane per shard",
    "--epoch-samples": "every image once per epoch",
    "--max-per-class": "no cap per class",
    "--max-images": "no cap: all images",
    "--teacher-cache-topk": "full logits instead of FKD's top-k",
    "--teacher-cache-max-gb": "no size limit",
    "--shots": "the full train split",
    "--refine-steps": "no refinement after the coarse C sweep",
    "--workers": "load images in-process",
    "--num-workers": "load images in-process",
    "--layers": "block index 0: the input of the first visual block",
    "--warmup-epochs": "no warm-up",
    "--weight-decay": "no decay",
    "--translate": "no random shifts",
    "--noise": "no pixel noise",
    "--eval-every": "evaluate only after the last epoch",
    "--checkpoint-every": "resume points at epoch ends only",
}


def _fixtures(root: Path) -> dict[str, str]:
    """Paths of every shape the edge values need."""
    folder = root / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    utf8 = root / "classes.txt"
    utf8.write_text("red star\nblaue Stra\u00dfe\n", encoding="utf-8")
    latin1 = root / "latin1.txt"
    latin1.write_bytes("blaue Stra\u00dfe\ncaf\u00e9\n".encode("latin-1"))
    checkpoint = root / "ck.safetensors"
    checkpoint.write_bytes(b"")
    (root / "ck.json").write_text("{}")
    return {
        "file": str(utf8),
        "folder": str(folder),
        "missing": str(root / "missing" / "nothing.txt"),
        "latin1": str(latin1),
        "checkpoint": str(checkpoint),
        "new_folder": str(root / "new" / "out"),
        "new_file": str(root / "new" / "out.csv"),
        "under_file": str(utf8 / "sub"),
        "unwritable": "/proc/promptkd-edge/out",
    }


def edge_values(kind: str, p: dict[str, str]) -> tuple[list[str], list[str]]:
    """(values that must be refused, values that must be accepted) for a kind of check."""
    huge = str(10**20)
    numbers = {
        "count": (["0", "-1", "nan", "inf", "2.5", huge, "", "x"], ["1", str(validate.MAX_COUNT)]),
        "count0": (["-1", "-5", "nan", "inf", "2.5", huge, ""], ["0", "1"]),
        "seed": (["-1", "nan", str(2**32), huge, ""], ["0", str(2**32 - 1)]),
        "positive_float": (["0", "-1", "nan", "inf", "-inf", "1e999", ""], ["1e-9", "3"]),
        "non_negative_float": (["-1e-9", "-1", "nan", "inf", ""], ["0", "2.5"]),
        "finite_float": (["nan", "inf", "-inf", "1e999", ""], ["-1", "0"]),
        "probability": (["-0.1", "1.5", "nan", ""], ["0", "1"]),
        "fraction": (["0", "-0.1", "1.5", "nan", ""], ["1e-9", "1"]),
        "text": (["", "   "], ["x"]),
    }
    paths = {
        "input_path": ([p["missing"], ""], [p["file"], p["folder"]]),
        "input_file": ([p["missing"], p["folder"], ""], [p["file"]]),
        "input_folder": ([p["missing"], p["file"], ""], [p["folder"]]),
        "text_file": ([p["missing"], p["folder"], p["latin1"], ""], [p["file"]]),
        "checkpoint": ([p["missing"], p["folder"], ""], [p["checkpoint"]]),
        "output_folder": ([p["file"], p["under_file"], p["unwritable"], ""], [p["new_folder"], p["folder"]]),
        "output_file": ([p["folder"], p["under_file"], p["unwritable"], ""], [p["new_file"], p["file"]]),
    }
    return {**numbers, **paths}[kind]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    """(command path, parser, action) for every argument that takes a value, nested subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        elif action.nargs != 0 and not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, parser, action


def _arguments():
    return [(path, parser, action) for path, parser, action in _walk(build_parser(), ()) if path]


def _name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def _values(action: argparse.Action, value: str) -> list[str]:
    count = action.nargs if isinstance(action.nargs, int) else 1
    return [value] * count


def _base_argv(
    parser: argparse.ArgumentParser, p: dict[str, str], skip: argparse.Action
) -> tuple[list[str], list[str]]:
    """(options, positionals): every required argument but ``skip`` (the one under test) with an accepted value."""
    argv: list[str] = []
    positionals: list[str] = []
    for action in parser._actions:
        if action is skip or isinstance(action, argparse._SubParsersAction) or action.nargs == 0:
            continue
        if not (action.required or not action.option_strings):
            continue
        value = (action.choices and next(iter(action.choices))) or edge_values(validate.kind_of(action.type), p)[1][0]
        if action.option_strings:
            argv += [action.option_strings[0], *_values(action, value)]
        else:
            positionals += _values(action, value)
    return argv, positionals


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """Every command's run replaced by a stub that records the parsed arguments; the working folder a scratch one."""
    calls = []
    for module_name in COMMANDS.values():
        module = importlib.import_module(f"promptkd.cli.{module_name}")
        monkeypatch.setattr(module, "run", lambda args, _calls=calls: _calls.append(args) or 0)
    monkeypatch.chdir(tmp_path)
    return calls, _fixtures(tmp_path)


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_every_option_has_a_checked_kind():
    """No option takes a value unchecked: each has a kind from promptkd.cli.validate or a fixed set of choices, and
    an option whose 0 (or non-negative float) is accepted says what 0 means (ZERO_MEANS)."""
    unchecked, undocumented = [], []
    for path, _, action in _arguments():
        where = f"{' '.join(path)} {_name(action)}"
        if action.choices is not None:
            continue
        kind = validate.kind_of(action.type)
        if kind not in validate.KINDS:
            unchecked.append(where)
        elif kind in ("count0", "non_negative_float") and _name(action) not in ZERO_MEANS:
            undocumented.append(where)
    assert not unchecked, f"options without a shared check (use promptkd.cli.validate): {unchecked}"
    assert not undocumented, f"options that accept 0 without saying what it means (ZERO_MEANS): {undocumented}"
    assert len(_arguments()) > 150


def test_every_list_option_keeps_every_repeat():
    """`--set a=1 --set b=2` (and every other option taking a list) keeps both: argparse's plain store keeps only
    the last occurrence, which silently dropped overrides."""
    lists = [(path, action) for path, _, action in _arguments() if action.option_strings and action.nargs in ("*", "+")]
    from promptkd.cli.validate import Repeatable

    dropping = [f"{' '.join(path)} {_name(action)}" for path, action in lists if not isinstance(action, Repeatable)]
    assert lists and not dropping, f"options that keep only their last repeat: {dropping}"
    seeds = next(action for path, action in lists if path == ("protocol",) and _name(action) == "--seeds")
    namespace = argparse.Namespace(seeds=seeds.default)
    seeds(None, namespace, [4])
    seeds(None, namespace, [5])
    assert namespace.seeds == [4, 5] and seeds.default == [1, 2, 3]  # the first repeat replaces the default


@pytest.mark.slow
def test_every_option_refuses_its_edge_values_in_one_line_and_accepts_the_rest(stubbed):
    calls, p = stubbed
    checked = 0
    for path, parser, action in _arguments():
        if action.choices is not None:
            refused, accepted = ["not-a-choice"], [str(next(iter(action.choices)))]
        else:
            refused, accepted = edge_values(validate.kind_of(action.type), p)
        options, positionals = _base_argv(parser, p, skip=action)
        for value, ok in [(v, False) for v in refused] + [(v, True) for v in accepted]:
            if action.option_strings:
                given = (
                    [f"{action.option_strings[0]}={value}"]
                    if action.nargs is None
                    else [action.option_strings[0], *_values(action, value)]
                )
                full = [*path, *positionals, *options, *given]
            else:  # a positional: its place among the others is its order in the parser
                place = [a for a in parser._actions if not a.option_strings and a.nargs != 0]
                values = list(positionals)
                index = sum(len(_values(a, "x")) for a in place[: place.index(action)])
                values[index:index] = _values(action, value)
                full = [*path, *values, *options]
            before = len(calls)
            code, err = _run(full)
            where = f"{' '.join(full)!r}"
            assert "Traceback" not in err, where
            if ok:
                assert code == 0 and len(calls) == before + 1, f"{where} was refused: {err}"
            else:
                lines = err.strip().splitlines()
                assert code == 2 and len(calls) == before, f"{where} was accepted"
                assert len(lines) == 1 and lines[0].startswith("error: argument "), f"{where}: {err}"
                named = f"error: argument {'/'.join(action.option_strings) or action.metavar or action.dest}:"
                assert lines[0].startswith(named), f"{where}: {err}"
            checked += 1
    assert checked > 1000


def test_the_issues_edge_values_are_refused_before_any_work(stubbed):
    """The values issue 18 found passing or crashing: each is one line naming the option."""
    calls, p = stubbed
    cases = [
        (["distill", "--views", "0"], "--views"),
        (["tta", "--batch-size", "0"], "--batch-size"),
        (["tta", "--max-images", "-1"], "--max-images"),
        (["distill", "--max-images", "-5"], "--max-images"),
        (["world-render", "--dataset", "shapes", "--count", "3", "--out", p["file"]], "--out"),
        (["distill", "--classnames", p["latin1"]], "not UTF-8"),
        (["zeroshot", "--dataset", "x", "--classnames", p["latin1"]], "not UTF-8"),
        (["features", "extend", p["checkpoint"], "--classes", p["latin1"]], "not UTF-8"),
    ]
    for argv, named in cases:
        code, err = _run(argv)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not calls


@pytest.mark.slow
def test_config_overrides_refuse_edge_values_before_any_work(tmp_path, monkeypatch):
    """--set reaches the typed configs: nan/inf, 0 epochs of a method that trains, a zero batch or LoRA alpha are one
    message from the command itself (not stubbed), before any data or model is read."""
    monkeypatch.chdir(tmp_path)
    commands = {
        "train": ["train", "--method", "coop", "--dataset", "shapes"],
        "attribute-search": ["attribute-search", "--dataset", "shapes", "--out", str(tmp_path / "a")],
        "distill": ["distill", "--teacher-model", "pkd-world-teacher", "--student-model", "pkd-world-student"],
        "teacher-cache": ["teacher-cache", "--teacher-model", "pkd-world-teacher", "--student-model", "x"],
        "protocol": ["protocol", "base2new", "--method", "coop", "--datasets", "shapes"],
        "pretrain": ["pretrain", "--data", "world", "--out", str(tmp_path / "p")],
    }
    bad = ["train.lr=nan", "train.lr=inf", "train.epochs=0", "train.batch_size=0", "train.weight_decay=-1"]
    with_set = {path[0] for path, _, action in _arguments() if action.dest in ("overrides", "set")}
    assert with_set == {*commands, "tta"}  # a new command with --set is added here
    for name, argv in commands.items():
        for override in bad:
            code, err = _run([*argv, "--set", override])
            key = override.split("=")[0].split(".")[-1]
            assert code == 2 and err.startswith("error: ") and key in err, (name, override, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, override, err)
    for override, key in (("batch_size=0", "batch_size"), ("max_images=-1", "max_images"), ("seed=-3", "seed")):
        code, err = _run(["tta", "--datasets", "shapes", "--set", override])
        assert code == 2 and key in err and len(err.strip().splitlines()) == 1, (override, err)
    code, err = _run([*commands["distill"], "--set", "method.lora_alpha=0"])
    assert code == 2 and "lora_alpha: must be above 0, got 0" in err
    assert not list(tmp_path.iterdir())  # nothing written by any refused run
