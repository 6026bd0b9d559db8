"""`promptkd features`: work on stored teacher features; `extend` adds classes after distillation."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "stored teacher features: add classes after distillation (extend), or show what a file holds (show)"

_EPILOG = """\
examples:
  promptkd features extend runs/pkd/teacher_features --teacher runs/teacher/prompts --classes new_classes.txt
  promptkd features show runs/pkd/teacher_features

`extend` runs the teacher's text tower once, for the new names only, and appends their rows (existing rows are copied
bit for bit); the distilled student then scores the longer list with no retraining (`promptkd predict` picks it up).
The teacher must be the one that computed the file (a zero-shot CLIP teacher: --teacher-model/--teacher-pretrained).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args

    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    extend = actions.add_parser("extend", help="append the teacher's features of new class names")
    extend.add_argument(
        "features", type=v.checkpoint, help="stored teacher features (teacher_features.safetensors or its stem)"
    )
    extend.add_argument("--teacher", type=v.checkpoint, default=None, metavar="CKPT", help="the teacher's checkpoint")
    add_backbone_args(extend, prefix="teacher")
    extend.add_argument(
        "--classes", type=v.text_file, required=True, metavar="FILE", help="new class names (.txt one per line, .json)"
    )
    extend.add_argument(
        "--out", type=v.output_file, default=None, help="write here instead of replacing FEATURES (atomically)"
    )
    extend.add_argument("--device", type=v.text, default="cpu")
    show = actions.add_parser("show", help="classes, teacher and extensions of a features file")
    show.add_argument("features", type=v.checkpoint)


def run(args: argparse.Namespace) -> int:
    from promptkd.data.userdata import read_classnames
    from promptkd.distill.teacher import TeacherFeatures, build_teacher, teacher_description
    from promptkd.errors import PromptKDError

    stored = TeacherFeatures.load(args.features)
    if args.action == "show":
        print(
            f"{stored.source}: {len(stored.classnames)} classes x {stored.embed_dim}, logit scale "
            f"{stored.logit_scale:.2f}; teacher: {teacher_description(stored.teacher)}"
        )
        for record in stored.extensions:
            print(
                f"  extended: +{record['added']} classes after the first {record['num_classes_before']} "
                f"({record.get('created', '?')})"
            )
        return 0
    if not args.teacher and not args.teacher_model:
        raise PromptKDError(
            "give the teacher that computed the features: --teacher CKPT (or --teacher-model and "
            "--teacher-pretrained for a zero-shot CLIP teacher)."
        )
    names = read_classnames(args.classes)
    teacher = build_teacher(  # a zero-shot teacher gets the templates recorded with the features
        args.teacher,
        model=args.teacher_model,
        pretrained=args.teacher_pretrained,
        quick_gelu=args.teacher_quick_gelu,
        templates=None if args.teacher else (stored.teacher.get("method_config") or {}).get("templates"),
        device=args.device,
    )
    extended = stored.extend(teacher, names)
    written = extended.save(args.out or stored.source)
    print(
        f"{written}: {len(stored.classnames)} + {len(names)} = {len(extended.classnames)} classes "
        f"(existing rows unchanged); the student scores them with no retraining."
    )
    return 0
