"""`promptkd protocol`: run a whole protocol (few-shot, base-to-novel, cross-dataset, domain generalisation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from promptkd.cli import validate as v
from promptkd.cli.common import add_overrides_arg

HELP = "run a protocol over datasets x seeds (resumable; finished runs are skipped) and write its report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.protocols import PROTOCOLS

    parser.add_argument("protocol", choices=PROTOCOLS)
    parser.add_argument("--method", type=v.text, required=True)
    parser.add_argument("--preset", type=v.text, default=None, help="the method's YAML preset (e.g. world)")
    parser.add_argument(
        "--datasets",
        nargs="+",
        action=v.Repeatable,
        type=v.text,
        required=True,
        help="training datasets (the source for transfer)",
    )
    parser.add_argument(
        "--targets",
        nargs="*",
        action=v.Repeatable,
        type=v.text,
        default=None,
        help="cross-dataset / DG evaluation datasets",
    )
    parser.add_argument("--seeds", nargs="+", action=v.Repeatable, type=v.seed, default=[1, 2, 3])
    parser.add_argument(
        "--shots",
        nargs="+",
        action=v.Repeatable,
        type=v.count,
        default=None,
        help="few-shot K values (default 1 2 4 8 16); other protocols use 16",
    )
    parser.add_argument("--data-root", type=v.input_folder, default=None)
    parser.add_argument("--model", type=v.text, default=None)
    parser.add_argument("--pretrained", type=v.text, default=None)
    parser.add_argument("--device", type=v.text, default=None)
    parser.add_argument("--out", type=v.output_folder, default="runs/protocols")
    add_overrides_arg(parser, "train.epochs=5 method.n_ctx=8")
    kd = parser.add_argument_group(
        "--method promptkd (per dataset and seed: PromptSRC teacher -> stored features -> distilled student; "
        "--model/--pretrained/--preset name the student)"
    )
    kd.add_argument(
        "--teacher",
        type=v.input_folder,
        default=None,
        help="folder of teachers: <dataset>/[seed_<s>/]<checkpoint> (promptkd or the reference's Dassl files, "
        "converted on the fly); default: train PromptSRC on 16 shots per dataset and seed",
    )
    kd.add_argument("--teacher-preset", type=v.text, default=None, help="PromptSRC preset of trained teachers")
    kd.add_argument("--teacher-model", type=v.text, default=None, help="teacher backbone (default: the preset's pair)")
    kd.add_argument("--teacher-pretrained", type=v.text, default=None, help="teacher weights (tag or file)")
    add_overrides_arg(
        kd,
        "train.epochs=5 (--set applies to the students)",
        flag="--teacher-set",
        dest="teacher_overrides",
        what="overrides of trained teachers' config",
    )
    kd.add_argument(
        "--mode",
        choices=("transductive", "inductive"),
        default="transductive",
        help="students see the unlabelled train images of all classes (the paper) or of the base classes only",
    )
    kd.add_argument(
        "--teacher-cache",
        action="store_true",
        help="store the teacher's soft labels per dataset and seed (<run>/teacher_cache) and distil from them",
    )


def run(args: argparse.Namespace) -> int:
    from promptkd.protocols import ProtocolSpec, run_protocol

    spec = ProtocolSpec(
        protocol=args.protocol,
        method=args.method,
        preset=args.preset,
        datasets=args.datasets,
        seeds=args.seeds,
        out=args.out,
        data_root=args.data_root,
        shots=args.shots,
        targets=args.targets,
        model=args.model,
        pretrained=args.pretrained,
        device=args.device,
        overrides=args.overrides,
        teacher=args.teacher,
        teacher_preset=args.teacher_preset,
        teacher_model=args.teacher_model,
        teacher_pretrained=args.teacher_pretrained,
        teacher_overrides=args.teacher_overrides,
        mode=args.mode,
        teacher_cache=args.teacher_cache,
    )
    summary = run_protocol(spec)
    if spec.method == "promptkd":
        if not summary["report"]:  # another torchrun process: the main one reports
            return 0
        print(
            f"{summary['runs']} dataset x seed runs: {summary['teachers']} teachers trained, {summary['features']} "
            f"feature files computed, {summary['students']} students distilled, {summary['scored']} rows scored; "
            f"report: {summary['report']}"
        )
        md = summary["report"].get("markdown")
        if md:
            print(Path(md).read_text())
        return 0
    print(f"{summary['ran']} runs trained, {summary['skipped']} already done; report: {summary['report']}")
    md = summary["report"].get("markdown") or next((v for k, v in summary["report"].items() if v.endswith(".md")), None)
    if md:
        print(Path(md).read_text())
    return 0
