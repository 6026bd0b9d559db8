"""`promptkd features`: work on stored teacher features; `extend` adds classes after distillation, `calibrate` weighs
their rows against the old ones for a student."""

from __future__ import annotations

import argparse
import logging

from promptkd.cli import validate as v

logger = logging.getLogger(__name__)

HELP = (
    "stored teacher features: add classes after distillation (extend), calibrate a student's old rows against the "
    "new (calibrate), or show what a file holds (show)"
)

_EPILOG = """\
examples:
  promptkd features extend runs/pkd/teacher_features --teacher runs/teacher/prompts --classes new_classes.txt
  promptkd features extend runs/pkd/teacher_features --teacher runs/teacher/prompts --classes new_classes.txt \\
      --student runs/pkd/prompts --images new_images old_images [--distill-epochs 2 --student-out runs/pkd_new]
  promptkd features calibrate runs/pkd/teacher_features --teacher runs/teacher/prompts --student runs/pkd/prompts \\
      --images new_images old_images
  promptkd features show runs/pkd/teacher_features

`extend` runs the teacher's text tower once, for the new names only, and appends their rows (existing rows are copied
bit for bit); the distilled student then scores the longer list with no retraining (`promptkd predict` picks it up).
The teacher must be the one that computed the file (a zero-shot CLIP teacher: --teacher-model/--teacher-pretrained).

A student distilled on the old classes only scores its old rows high: among all names most images of a new class go
to an old one. With unlabelled images (no labels read; new classes and some old ones, e.g. the distillation images),
`extend --student CKPT --images DIR` also fits a calibration (a scale and bias per row group, matched to the teacher
on those images) stored beside the features as <stem>.calibration.json and applied by `promptkd predict`; add
--distill-epochs N --student-out DIR to first distil the student briefly on those images over all names (a new run
folder, then calibrated). `calibrate` fits the calibration alone, e.g. after more images arrive.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args

    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    extend = actions.add_parser("extend", help="append the teacher's features of new class names")
    extend.add_argument(
        "features", type=v.features, help="stored teacher features (teacher_features.safetensors or its stem)"
    )
    extend.add_argument(
        "--teacher", type=v.teacher_checkpoint, default=None, metavar="CKPT", help="the teacher's checkpoint"
    )
    add_backbone_args(extend, prefix="teacher")
    extend.add_argument(
        "--classes", type=v.text_file, required=True, metavar="FILE", help="new class names (.txt one per line, .json)"
    )
    extend.add_argument(
        "--out", type=v.output_file, default=None, help="write here instead of replacing FEATURES (atomically)"
    )
    extend.add_argument("--device", type=v.text, default="cpu")
    _add_student_args(extend, required=False)
    extend.add_argument(
        "--distill-epochs",
        type=v.count,
        default=None,
        metavar="N",
        help="with --student and --images: distil the student N epochs on the images over all names first",
    )
    extend.add_argument(
        "--student-out", type=v.output_folder, default=None, metavar="DIR", help="run folder of the distilled student"
    )
    extend.add_argument("--seed", type=v.seed, default=1, help="seed of the short distillation (default 1)")
    calibrate = actions.add_parser("calibrate", help="fit a student's calibration of added rows (no labels)")
    calibrate.add_argument("features", type=v.features, help="extended teacher features (promptkd features extend)")
    calibrate.add_argument(
        "--teacher", type=v.teacher_checkpoint, default=None, metavar="CKPT", help="the teacher's checkpoint"
    )
    add_backbone_args(calibrate, prefix="teacher")
    calibrate.add_argument("--device", type=v.text, default="cpu")
    _add_student_args(calibrate, required=True)
    show = actions.add_parser("show", help="classes, teacher and extensions of a features file")
    show.add_argument("features", type=v.features)


def _add_student_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--student",
        type=v.checkpoint,
        required=required,
        default=None,
        metavar="CKPT",
        help="the distilled student (its prompts checkpoint) to calibrate against the added rows",
    )
    parser.add_argument(
        "--images",
        type=v.input_path,
        nargs="+",
        action=v.Repeatable,
        required=required,
        default=None,
        metavar="DIR",
        help="unlabelled images (folders, files or .txt lists): new classes, and some old ones",
    )


def run(args: argparse.Namespace) -> int:
    from promptkd.data.userdata import read_classnames
    from promptkd.distill.teacher import TeacherFeatures, teacher_description
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
        _show_calibration(stored)
        return 0
    teacher = _teacher(args, stored)
    if args.action == "calibrate":
        _calibrate(args, args.features, teacher)
        return 0
    if (args.student is None) != (args.images is None):
        raise PromptKDError("give --student CKPT and --images DIR together (the student is calibrated on the images).")
    if (args.distill_epochs is None) != (args.student_out is None):
        raise PromptKDError(
            "give --distill-epochs N and --student-out DIR together (where the distilled student goes)."
        )
    if args.distill_epochs is not None and args.student is None:
        raise PromptKDError("--distill-epochs distils a student: give --student CKPT and --images DIR too.")
    names = read_classnames(args.classes)
    extended = stored.extend(teacher, names)
    written = extended.save(args.out or stored.source)
    print(
        f"{written}: {len(stored.classnames)} + {len(names)} = {len(extended.classnames)} classes "
        f"(existing rows unchanged); the student scores them with no retraining."
    )
    if args.student is not None:
        _calibrate(args, written, teacher)
    return 0


def _show_calibration(stored) -> None:
    from promptkd.distill.extend import Calibration, calibration_path

    path = calibration_path(stored.source)
    if path.is_file():
        calibration = Calibration.load(path)
        count = calibration.fitted.get("images", "?")
        print(f"  calibration {path.name} ({calibration.describe()}) on {count} unlabelled images")


def _teacher(args: argparse.Namespace, stored):
    from promptkd.distill.teacher import build_teacher
    from promptkd.errors import PromptKDError

    if not args.teacher and not args.teacher_model:
        raise PromptKDError(
            "give the teacher that computed the features: --teacher CKPT (or --teacher-model and "
            "--teacher-pretrained for a zero-shot CLIP teacher)."
        )
    return build_teacher(  # a zero-shot teacher gets the templates recorded with the features
        args.teacher,
        model=args.teacher_model,
        pretrained=args.teacher_pretrained,
        quick_gelu=args.teacher_quick_gelu,
        templates=None if args.teacher else (stored.teacher.get("method_config") or {}).get("templates"),
        device=args.device,
        seed=(stored.teacher.get("about") or {}).get("seed"),  # random teacher weights are drawn from this seed
    )


def _calibrate(args: argparse.Namespace, features, teacher) -> None:
    """Optionally distil the student briefly on the images, then fit and store its calibration."""
    from promptkd.checkpoints import load_checkpoint
    from promptkd.deploy import image_paths, load_for_inference
    from promptkd.distill.extend import (
        added_share,
        calibrate,
        calibration_path,
        distill_new_classes,
        one_sided_warning,
        paired_logits,
        row_groups,
    )
    from promptkd.distill.teacher import TeacherFeatures

    stored = TeacherFeatures.load(features)
    student = load_for_inference(args.student, features, device=args.device)
    student.set_classnames(list(stored.classnames))
    paths = image_paths(args.images)
    epochs = getattr(args, "distill_epochs", None)
    if epochs is not None:
        warning = one_sided_warning(
            added_share(paired_logits(student, teacher, paths)[1], row_groups(stored)), row_groups(stored)
        )
        if warning:
            logger.warning("%s", warning)
        settings = dict(load_checkpoint(args.student)[1].get("train") or {})
        checkpoint = distill_new_classes(
            student, teacher, paths, args.student_out, epochs=epochs, seed=args.seed, settings=settings
        )
        print(f"{checkpoint}: the student distilled {epochs} epochs on {len(paths)} images over all names")
        student = load_for_inference(checkpoint, device=args.device)
        stored = student.stored
    calibration = calibrate(student, teacher, paths, images=" ".join(args.images))
    warning = one_sided_warning(calibration.fitted["teacher_added_share"], calibration.groups)
    if warning and epochs is None:
        logger.warning("%s", warning)
    path = calibration.save(calibration_path(stored.source))
    agreement = calibration.fitted["teacher_agreement"]
    print(
        f"{path}: calibration on {len(paths)} unlabelled images ({calibration.describe()}); top-1 agreement with "
        f"the teacher {100 * agreement['before']:.1f}% -> {100 * agreement['after']:.1f}%; promptkd predict applies it."
    )
