"""`promptkd world-render`: as many unlabelled images of a world dataset's domain as asked, for distillation."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "render N unlabelled images of a world dataset's domain (seeded; never a train/val/test image)"

_EPILOG = """\
example:
  promptkd world-render --dataset shapes --count 20000 --out runs/shapes-unlabeled
  promptkd distill --teacher runs/teacher/prompts --student-model pkd-world-student --preset world \\
      --unlabeled-folder runs/shapes-unlabeled/images --classnames runs/shapes-unlabeled/classnames.txt

Images are written flat (numbered, no class in the name); classnames.txt holds the dataset's whole class list.
--classes base renders the base half only (inductive distillation; the logits still cover every class listed).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--dataset", type=v.text, required=True, help="world dataset (shapes, patterns, counts, ...)")
    parser.add_argument("--count", type=v.count, required=True, metavar="N", help="images to render")
    parser.add_argument("--out", type=v.output_folder, required=True, help="an empty or new folder")
    parser.add_argument("--seed", type=v.seed, default=1, help="another seed, other images (default 1)")
    parser.add_argument("--classes", choices=["all", "base"], default="all", help="classes drawn (default all)")
    parser.add_argument("--workers", type=v.count, default=None, help="render processes (default: up to 4)")


def run(args: argparse.Namespace) -> int:
    from promptkd.data.world import render_unlabeled

    root = render_unlabeled(
        args.dataset, args.count, args.out, seed=args.seed, classes=args.classes, workers=args.workers
    )
    print(f"{args.count} unlabelled {args.dataset} images at {root / 'images'}; classes: {root / 'classnames.txt'}")
    return 0
