"""`promptkd teacher-cache`: fill a teacher cache ahead of time (FKD), e.g. on another machine or with torchrun."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "compute and store the teacher's logits of every stored view of every unlabelled image (FKD), for distill"

_EPILOG = """\
Takes the same arguments as `promptkd distill` (teacher, student model, images, --preset/--set, --teacher-cache,
--views, --view-seed, top-k and dtype): the stored views depend on the student's input and the preset's crop range,
and the cache refuses a distillation run with anything else. Views already stored for an image's current content
are skipped (a killed fill resumes; damaged chunks and changed images are recomputed and stored again, which repairs
the cache); a cache folder that cannot store is an error (exit 2).
`torchrun --nproc-per-node N -m promptkd.cli.main teacher-cache ...` splits the images across processes.

example:
  promptkd teacher-cache --teacher runs/teacher/prompts --student-model pkd-world-student --preset world \\
      --dataset shapes --teacher-cache runs/cache --views 10 --out runs/cache-fill
  promptkd distill ... --teacher-cache runs/cache --views 10      # the teacher's image tower no longer runs
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli import distill

    distill.add_arguments(parser)
    parser.epilog = _EPILOG
    parser.add_argument("--batch-size", type=v.count, default=64, help="views per teacher forward (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.distill import config_from_args
    from promptkd.distill.run import fill_teacher_cache
    from promptkd.errors import PromptKDError

    if args.batch_size < 1:
        raise PromptKDError(f"--batch-size must be at least 1, got {args.batch_size}.")
    summary = fill_teacher_cache(config_from_args(args), batch_size=args.batch_size, progress=not args.no_progress)
    print(
        f"teacher cache {summary['folder']}: {summary['entries']} views stored ({summary['written']} new), "
        f"{len(summary['skipped_images'])} unreadable images skipped"
        + (f"; {summary['content_changed']} recomputed: image content changed" if summary["content_changed"] else "")
        + (f"; {summary['bad_chunks']} damaged chunks repaired" if summary["bad_chunks"] else "")
    )
    return 0
