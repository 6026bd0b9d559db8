"""Classes added after distillation, on the world (shapes, patterns, counts): does an extended student recognise them
where it matters, among all the names `predict` scores?

    python scripts/world_extend.py --out runs/world_extend [--datasets shapes patterns counts] [--seeds 1 2 3]

Per dataset: one PromptSRC teacher (16 shots of the base classes, seed 1, `--preset world`); per student seed:

- zero-shot student: pkd-world-student with the dataset's template, no distillation;
- extended as is: the paper's student distilled inductively (base-class train images, base-class features only),
  then `promptkd features extend` adds the novel names;
- calibrated: the same student with a label-free calibration of old against new rows, fitted by
  `promptkd features calibrate` on unlabelled train images of all classes against the teacher;
- briefly distilled: the extended student distilled for a few epochs on unlabelled train images of all classes (the
  base ones replayed), or of the new classes only, `promptkd features extend ... --student --images
  --distill-epochs`, then calibrated on the same images;
- transductive student (reference): distilled on the train images of all classes with all features (the paper);
  and the teacher itself over all names.

Columns: base (base images among the base names), novel (novel images among the novel names), novel among all
names, base among all names, all (every test image among every name: what `predict` does). No test label is used to
fit anything: labels only score. Prints a Markdown table of seed means and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

STUDENT, TEACHER = "pkd-world-student", "pkd-world-teacher"
COLUMNS = ("base", "novel", "novel_all", "base_all", "all")


def cli(args: list[str]) -> None:
    from promptkd.cli.main import main

    code = main(args)
    if code:
        raise SystemExit(f"promptkd failed ({code}): {' '.join(args)}")


def link_images(items: list[Any], folder: Path) -> Path:
    """A flat folder of links to ``items``' images (no class in the names: unlabelled for the student)."""
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for k, datum in enumerate(items):
            os.symlink(os.path.abspath(datum.path), folder / f"{k:05d}{Path(datum.path).suffix}")
    return folder


def prepare(dataset: str, root: str, out: Path) -> dict[str, Any]:
    """Class lists and unlabelled image folders of one dataset, and its PromptSRC teacher (trained once)."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.sampling import subsample_classes

    splits = resolve_dataset(dataset, root)
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    folder = out / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.txt").write_text("\n".join(base.classnames) + "\n")
    (folder / "new.txt").write_text("\n".join(new.classnames) + "\n")
    teacher = folder / "teacher_seed1"
    if not (teacher / "prompts.safetensors").is_file():
        cli(
            ["train", "--method", "promptsrc", "--preset", "world", "--model", TEACHER, "--pretrained", "shipped",
             "--dataset", dataset, "--data-root", root, "--shots", "16", "--subsample", "base", "--seed", "1",
             "--out", str(teacher), "--set", "train.progress=false"]
        )  # fmt: skip
    return {
        "splits": splits,
        "base": list(base.classnames),
        "new": list(new.classnames),
        "teacher": str(teacher / "prompts"),
        "base_images": link_images(base.train, folder / "base_images"),
        "new_images": link_images(new.train, folder / "new_images"),
        "all_images": link_images(splits.train, folder / "all_images"),
        "folder": folder,
    }


def students(data: dict[str, Any], dataset: str, root: str, seed: int) -> dict[str, Path]:
    """The transductive and the inductive student of one seed (a finished run is reused)."""
    folder = data["folder"]
    common = ["--teacher", data["teacher"], "--preset", "world", "--student-model", STUDENT, "--seed", str(seed)]
    quiet = ["--set", "train.progress=false"]
    runs = {
        "transductive": ["--dataset", dataset, "--data-root", root, "--no-eval"],
        "inductive": ["--unlabeled-folder", str(data["base_images"]), "--classnames", str(folder / "base.txt"),
                      "--no-eval"],
    }  # fmt: skip
    out = {}
    for name, extra in runs.items():
        run = folder / f"{name}_seed{seed}"
        if not (run / "prompts.safetensors").is_file():
            cli(["distill", *common, *extra, "--out", str(run), *quiet])
        out[name] = run
    return out


def variants(data: dict[str, Any], run: Path, epochs: int) -> dict[str, tuple[Path, Path, bool]]:
    """The extended student as is, calibrated, and briefly distilled on unlabelled images of all classes or of the new
    classes only (each as is and calibrated on the same images), made through the CLI: name -> (student checkpoint,
    features, apply the stored calibration)."""
    teacher = ["--teacher", data["teacher"]]
    images = ["--images", str(data["base_images"]), str(data["new_images"])]
    classes = ["--classes", str(data["folder"] / "new.txt")]
    extended = run / "extended" / "teacher_features"
    if not extended.with_suffix(".calibration.json").is_file():
        cli(["features", "extend", str(run / "teacher_features"), *teacher, *classes, "--out", str(extended),
             "--student", str(run / "prompts"), *images])  # fmt: skip
    brief = run / "brief"
    if not (brief / "teacher_features.calibration.json").is_file():
        cli(["features", "extend", str(run / "teacher_features"), *teacher, *classes, "--out",
             str(run / "brief_features"), "--student", str(run / "prompts"), *images, "--distill-epochs",
             str(epochs), "--student-out", str(brief)])  # fmt: skip
    only_new = run / "brief_new"
    if not (only_new / "teacher_features.calibration.json").is_file():
        cli(["features", "extend", str(run / "teacher_features"), *teacher, *classes, "--out",
             str(run / "brief_new_features"), "--student", str(run / "prompts"), "--images", str(data["new_images"]),
             "--distill-epochs", str(epochs), "--student-out", str(only_new)])  # fmt: skip
    return {
        "extended student, as is": (run / "prompts", extended, False),
        "extended + calibrated": (run / "prompts", extended, True),
        f"extended + distilled {epochs} epochs": (brief / "prompts", brief / "teacher_features", False),
        f"extended + distilled {epochs} epochs + calibrated": (brief / "prompts", brief / "teacher_features", True),
        f"extended + distilled {epochs} epochs on new-class images only": (
            only_new / "prompts", only_new / "teacher_features", False),
        f"extended + distilled {epochs} epochs on new-class images only + calibrated": (
            only_new / "prompts", only_new / "teacher_features", True),
    }  # fmt: skip


def score(logits: Any, labels: Any, num_base: int) -> dict[str, float]:
    """The five columns (see the module docstring) from logits over base + new names (that order)."""
    base = labels < num_base
    new = ~base
    hit_all = logits.argmax(-1) == labels
    hit_base = logits[:, :num_base].argmax(-1) == labels
    hit_new = logits[:, num_base:].argmax(-1) + num_base == labels
    return {
        "base": 100 * hit_base[base].float().mean().item(),
        "novel": 100 * hit_new[new].float().mean().item(),
        "novel_all": 100 * hit_all[new].float().mean().item(),
        "base_all": 100 * hit_all[base].float().mean().item(),
        "all": 100 * hit_all.float().mean().item(),
        "novel_to_base": 100 * (logits[new].argmax(-1) < num_base).float().mean().item(),
    }


def test_logits(data: dict[str, Any], logits_of: Any, preprocess: Any) -> tuple[Any, Any]:
    """Logits over base + new names of every test image, and labels in that order."""
    import torch

    from promptkd.data.items import ImageDataset
    from promptkd.data.transforms import build_transform

    names = data["base"] + data["new"]
    test = data["splits"].test
    labels = torch.tensor([names.index(d.classname) for d in test])
    loader = torch.utils.data.DataLoader(
        ImageDataset([d.path for d in test], build_transform(preprocess, train=False)), batch_size=256
    )
    with torch.no_grad():
        logits = torch.cat([logits_of(images).float() for images, _ in loader])
    return logits, labels


def teacher_logits(data: dict[str, Any], stored: Any, names: list[str]) -> tuple[Any, Any]:
    """The teacher's logits over the names (rows of the extended features: the same teacher computed them)."""
    from promptkd.distill.teacher import load_teacher

    teacher = load_teacher(data["teacher"])
    rows, scale = stored.rows(names), float(stored.logit_scale)
    return test_logits(data, lambda x: teacher.logits(x, rows, scale), teacher.preprocess)


def evaluate(data: dict[str, Any], runs: dict[str, Path], epochs: int) -> dict[str, dict[str, float]]:
    """Every row of the table for one dataset and seed."""
    from promptkd.backbones import load_backbone
    from promptkd.backbones.weights import shipped_weights
    from promptkd.deploy import load_for_inference
    from promptkd.distill import zero_shot_teacher
    from promptkd.distill.extend import calibrator

    names, num_base = data["base"] + data["new"], len(data["base"])
    rows = {}
    zero = zero_shot_teacher(load_backbone(STUDENT, shipped_weights(STUDENT)).freeze(), [data["splits"].template])
    text = zero.text_features(names)
    scale = zero.logit_scale()
    rows["zero-shot student"] = score(
        *test_logits(data, lambda x: zero.logits(x, text, scale), zero.preprocess), num_base
    )
    for name, (checkpoint, features, calibrated) in variants(data, runs["inductive"], epochs).items():
        student = load_for_inference(checkpoint, features)
        assert student.classnames == names, "the extended list is base + new"
        calibrate = calibrator(student) if calibrated else (lambda z: z)
        logits_of = lambda x, c=calibrate, s=student: c(s.logits(x))  # noqa: E731
        rows[name] = score(*test_logits(data, logits_of, student.backbone.preprocess), num_base)
    rows["PromptSRC teacher (reference)"] = score(*teacher_logits(data, student.stored, names), num_base)
    reference = load_for_inference(runs["transductive"] / "prompts")
    reference.set_classnames(names)
    rows["transductive student (reference)"] = score(
        *test_logits(data, reference.logits, reference.backbone.preprocess), num_base
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/world_extend")
    parser.add_argument("--datasets", nargs="+", default=["counts", "patterns", "shapes"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--stage", choices=["students", "all"], default="all")
    parser.add_argument("--distill-epochs", type=int, default=2, help="the short distillation's epochs")
    parser.add_argument("--results", default="results.json", help="file name of the results under --out")
    parser.add_argument("--table-only", action="store_true", help="print the table of --results and exit")
    args = parser.parse_args()
    if args.table_only:
        print(table(json.loads((Path(args.out) / args.results).read_text())))
        return

    from promptkd.data.world import ensure_world

    root = str(ensure_world())
    out = Path(args.out)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for seed in args.seeds:
        for dataset in args.datasets:
            data = prepare(dataset, root, out)
            runs = students(data, dataset, root, seed)
            if args.stage == "students":
                continue
            for name, row in evaluate(data, runs, args.distill_epochs).items():
                results.setdefault(dataset, {}).setdefault(name, []).append({**row, "seed": seed})
            (out / args.results).write_text(json.dumps(results, indent=2) + "\n")
    if results:
        print(table(results))


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """Seed means per dataset and row, Markdown."""
    lines = [
        "| dataset | student | base | novel (among novel) | novel among all | base among all | all classes | "
        "novel → a base class | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, rows in results.items():
        for name, seeds in rows.items():
            mean = {k: sum(r[k] for r in seeds) / len(seeds) for k in (*COLUMNS, "novel_to_base")}
            spread = (sum((r["all"] - mean["all"]) ** 2 for r in seeds) / len(seeds)) ** 0.5
            cells = [f"{mean[k]:.1f}" for k in (*COLUMNS, "novel_to_base")]
            cells[COLUMNS.index("all")] += f" ± {spread:.1f}" if len(seeds) > 1 else ""
            lines.append(f"| {dataset} | {name} | {' | '.join(cells)} | {len(seeds)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
