"""`promptkd distill`: PromptKD stage II, distil a teacher checkpoint into a prompted student on unlabelled images."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v
from promptkd.cli.common import add_overrides_arg

HELP = "distil a prompted teacher into a small student on unlabelled images (PromptKD), then evaluate base/novel"

_EPILOG = """\
examples:
  promptkd distill --teacher runs/teacher/prompts --student-model pkd-world-student --preset world \\
      --dataset shapes --data-root world --out runs/pkd
  promptkd distill --teacher teacher.safetensors --teacher-pretrained ViT-L-14.pt --student-model ViT-B-16 \\
      --student-pretrained openai --preset vit_b16_c2_ep20_batch8_4+4ctx --dataset eurosat --data-root DATA
  promptkd distill --teacher runs/teacher/prompts --student-model pkd-world-student \\
      --unlabeled-folder my_images --classnames classes.txt --max-images 2000
  promptkd distill --teacher runs/teacher/prompts --student timm:test_convnext3 --student-pretrained random \\
      --preset world --dataset shapes --set method.train_layers=all    # any timm model as the student

The student never sees a label: dataset train splits lose theirs (--max-per-class counts per class in benchmark
splits only; folders take --max-images, streamed shards --epoch-samples). The teacher's text features are computed once,
after its checkpoint is loaded, and written to OUT/teacher_features.{safetensors,json}; the student and its
inference use only that file. Model selection: last epoch, or --set train.select=val (held-out validation split).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from promptkd.cli.common import add_backbone_args

    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    group = parser.add_argument_group("teacher")
    group.add_argument(
        "--teacher",
        type=v.teacher_checkpoint,
        default=None,
        metavar="CKPT",
        help="promptkd checkpoint of the teacher (any method: coop, ivlp, maple, promptsrc, zeroshot, ..., or one "
        "made by `promptkd convert`); its backbone is read from the checkpoint's JSON. Omit it with "
        "--teacher-model for a zero-shot CLIP teacher",
    )
    group.add_argument(
        "--teacher-features",
        type=v.features,
        default=None,
        metavar="FILE",
        help="reuse stored teacher features (checked against the class list and the teacher) instead of computing",
    )
    add_backbone_args(parser, prefix="teacher")
    add_backbone_args(parser, prefix="student", alias=True)
    parser.add_argument(
        "--student-kwargs",
        nargs="+",
        action=v.Repeatable,
        type=v.text,
        default=None,
        metavar="KEY=VALUE",
        help="timm students: arguments of timm.create_model, e.g. patch_size=4 depth=4 (values read as YAML)",
    )
    data = parser.add_argument_group("unlabelled images")
    data.add_argument(
        "--dataset", type=v.text, default=None, help="world/benchmark dataset or split-JSON folder (labels dropped)"
    )
    data.add_argument("--data-root", type=v.input_folder, default=None, help="folder holding the datasets")
    data.add_argument(
        "--unlabeled-folder", type=v.input_folder, default=None, metavar="DIR", help="a folder of images (any depth)"
    )
    data.add_argument(
        "--unlabeled-shards",
        type=v.text,
        default=None,
        metavar="PATTERN",
        help="WebDataset tar shards (.tar or .tar.gz), streamed, e.g. 'data/{000..099}.tar' (quote the braces)",
    )
    data.add_argument(
        "--lanes",
        type=v.count0,
        default=None,
        metavar="L",
        help="shards: parallel read lanes (default one per shard); a multiple of processes x workers; fix it to get "
        "the same result on any number of processes",
    )
    data.add_argument(
        "--epoch-samples", type=v.count0, default=None, metavar="N", help="shards: samples per epoch (default all once)"
    )
    data.add_argument(
        "--classnames", type=v.text_file, default=None, metavar="FILE", help="class names (folder/shard sources)"
    )
    data.add_argument(
        "--eval-dataset",
        type=v.text,
        default=None,
        metavar="NAME",
        help="folder/shard sources: score the student on this labelled dataset's test split (never trained on)",
    )
    data.add_argument(
        "--unlabeled-split",
        choices=["train", "test"],
        default=None,
        help="dataset split whose images are distilled on (default train; test only when asked, e.g. DG sets)",
    )
    data.add_argument(
        "--mode",
        choices=["transductive", "inductive"],
        default=None,
        help="transductive: images and logits of all classes (the paper); inductive: base classes only",
    )
    data.add_argument(
        "--skip-bad",
        action="store_true",
        default=None,
        help="leave unreadable images out (counted in the run's config.yaml) instead of stopping",
    )
    data.add_argument("--max-per-class", type=v.count0, default=None, metavar="K", help="at most K images per class")
    data.add_argument("--max-images", type=v.count0, default=None, metavar="N", help="at most N images in total")
    cache = parser.add_argument_group("teacher cache (FKD: the teacher runs once per stored view)")
    cache.add_argument(
        "--teacher-cache",
        type=v.output_folder,
        default=None,
        metavar="DIR",
        help="store the teacher's logits of each view here and read them back in later epochs, resumed runs, other "
        "seeds and sweeps; training then visits a fixed set of views per image (see --views). Each entry is bound "
        "to its image's content (another image under the same name is recomputed) and the folder to the teacher's "
        "weights and prompts by hash",
    )
    cache.add_argument("--views", type=v.count, default=None, metavar="K", help="stored views per image (default 10)")
    cache.add_argument("--view-seed", type=v.seed, default=None, help="seed of the views' crops (default 0)")
    cache.add_argument(
        "--teacher-cache-topk",
        type=v.count0,
        default=None,
        metavar="K",
        help="store FKD's top-k (values, indices, log-sum-exp) instead of full logits (needed above 4096 classes)",
    )
    cache.add_argument("--teacher-cache-dtype", choices=["fp32", "fp16"], default=None, help="stored values (fp32)")
    cache.add_argument(
        "--teacher-cache-max-gb",
        type=v.non_negative_float,
        default=None,
        metavar="GB",
        help="stop storing beyond this size",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--preset", type=v.text, default=None, help="promptkd preset (world, vit_b16_c2_ep20_batch8_4+4ctx, ...)"
    )
    run.add_argument(
        "--protocol",
        choices=["base2new", "all"],
        default=None,
        help="evaluation: base and novel halves + HM (default), or all classes (cross-dataset)",
    )
    run.add_argument("--seed", type=v.seed, default=None)
    run.add_argument("--device", type=v.text, default=None, help="cpu, cuda, ... (default: auto)")
    run.add_argument(
        "--out", type=v.output_folder, default=None, help="run folder (an unfinished run there is resumed)"
    )
    run.add_argument("--no-eval", dest="evaluate", action="store_false", default=None, help="skip the evaluation")
    add_overrides_arg(run, "train.epochs=5 train.lr=0.01 method.kd_weight=1000 method.kd_normalization=logits")
    run.add_argument("--list-presets", action="store_true", help="list the presets and exit")


def _key_values(items: list[str] | None) -> dict | None:
    import yaml

    from promptkd.config import ConfigError

    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--student-kwargs takes KEY=VALUE pairs, e.g. patch_size=4; got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def config_from_args(args: argparse.Namespace):
    """The distillation config these arguments describe (shared with `promptkd teacher-cache`)."""
    from promptkd.distill.run import resolve_distill_config
    from promptkd.methods.promptkd_timm import apply_student_overrides, split_student_overrides

    base = {
        "teacher": args.teacher,
        "teacher_model": args.teacher_model,
        "teacher_pretrained": args.teacher_pretrained,
        "teacher_quick_gelu": args.teacher_quick_gelu,
        "teacher_features": args.teacher_features,
        "student_model": args.student_model,
        "student_pretrained": args.student_pretrained,
        "student_quick_gelu": args.student_quick_gelu,
        "student_kwargs": _key_values(args.student_kwargs),
        "dataset": args.dataset,
        "data_root": args.data_root,
        "unlabeled_folder": args.unlabeled_folder,
        "unlabeled_shards": args.unlabeled_shards,
        "classnames": args.classnames,
        "eval_dataset": args.eval_dataset,
        "unlabeled_split": args.unlabeled_split,
        "max_per_class": args.max_per_class,
        "max_images": args.max_images,
        "skip_bad": args.skip_bad,
        "lanes": args.lanes,
        "epoch_samples": args.epoch_samples,
        "teacher_cache": args.teacher_cache,
        "views": args.views,
        "view_seed": args.view_seed,
        "teacher_cache_topk": args.teacher_cache_topk,
        "teacher_cache_dtype": args.teacher_cache_dtype,
        "teacher_cache_max_gb": args.teacher_cache_max_gb,
        "protocol": args.protocol,
        "seed": args.seed,
        "device": args.device,
        "out": args.out,
        "evaluate": args.evaluate,
        "mode": args.mode,
    }
    overrides, student_own = split_student_overrides(args.student_model, args.overrides or [])
    config = resolve_distill_config(args.preset, overrides, base)  # checked against the CLIP student's keys
    config.method_config = apply_student_overrides(config.method_config, student_own)  # a timm student's own
    return config


def run(args: argparse.Namespace) -> int:
    from promptkd.cli.common import print_table
    from promptkd.config import list_presets
    from promptkd.distill.run import run_distillation

    if args.list_presets:
        print("\n".join(list_presets("promptkd")))
        return 0
    outcome = run_distillation(config_from_args(args))
    rows = [
        (r["dataset"], r["subsample"], f"{100 * r['metrics']['acc1']:.2f}", r["num_samples"]) for r in outcome.results
    ]
    if rows:
        print_table(["dataset", "classes", "acc1 (%)", "images"], rows)
        if "hm" in outcome.results[0]:
            print(f"HM: {100 * outcome.results[0]['hm']:.2f}")
    print(f"run folder: {outcome.out} (selection: {outcome.selection}); teacher features: {outcome.features}")
    return 0
