"""Beyond the paper, on the world (shapes): which student wins, and classes added after distillation.

    python scripts/world_students.py --out runs/world_students --teacher TEACHER_CKPT [--seeds 1 2 3]

One PromptSRC teacher (default: the seed-1 teacher of scripts/world_results.py) teaches every student; the seeds
are the students'. Students:

- CLIP student pkd-world-student on shapes' train split (the paper's data): prompts + projector (the paper), with
  LoRA (rank 4) on its attention, with its last block unfrozen; and the paper's student on the rendered images;
- timm students from random weights on rendered unlabelled shapes images (promptkd world-render): two CNNs
  (test_convnext3; test_byobnet, trained longer: --cnn-epochs) and a small ViT (test_vit, patch 4);
- inductive + extend: the paper student distilled on base-class images with base-class features only, then
  `promptkd features extend` adds the novel names; its novel accuracy among the novel names and among all names
  (what `predict` does) against the transductive student's (calibration and a short distillation of the extended
  student: scripts/world_extend.py).

Every run shares the teacher's stored logits (one teacher cache per image set), so the teacher runs once per view.
Prints a Markdown table (HM, all-class accuracy, parameters, images/s vs the teacher, ONNX size) and writes
results.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

STUDENT = "pkd-world-student"
RENDERED = 10_000


def distill(args: list[str]) -> None:
    from promptkd.cli.main import main as cli

    code = cli(["distill", *args])
    if code:
        raise SystemExit(f"distill failed ({code}): {' '.join(args)}")


def halves(folder: Path) -> dict[str, float]:
    out = {}
    for path in folder.glob("*-classification.json"):
        data = json.loads(path.read_text())
        out[data["subsample"]] = 100 * data["metrics"]["acc1"]
        if "hm" in data:
            out["hm"] = 100 * data["hm"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/world_students")
    parser.add_argument("--teacher", default="runs/world_results/promptkd/seed_1/shapes/teacher/prompts")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--render", type=int, default=RENDERED, help="rendered unlabelled images for timm students")
    parser.add_argument("--timm-epochs", type=int, default=10)
    parser.add_argument("--cnn-epochs", type=int, default=30, help="test_byobnet's epochs (10 leave it at HM ~71)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these students")
    args = parser.parse_args()

    import torch

    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.world import ensure_world, render_unlabeled

    root = ensure_world()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = ["--teacher", args.teacher, "--preset", "world"]
    quiet = ["train.progress=false"]
    rendered = render_unlabeled("shapes", args.render, out / "rendered", seed=1)
    splits = resolve_dataset("shapes", root)

    def timm(model: str, epochs: int, *extra: str) -> list[str]:
        """A timm student from random weights on the rendered images, scored on shapes' test split."""
        return [
            "--student", f"timm:{model}", "--student-pretrained", "random", *extra,
            "--unlabeled-folder", str(rendered / "images"), "--classnames", str(rendered / "classnames.txt"),
            "--eval-dataset", "shapes", "--set", f"train.epochs={epochs}",
        ]  # fmt: skip

    students = {
        "prompts (paper)": ["--student-model", STUDENT, "--dataset", "shapes"],
        "prompts + LoRA r4": ["--student-model", STUDENT, "--dataset", "shapes", "--set", "method.lora_rank=4"],
        "prompts + last block": [
            "--student-model", STUDENT, "--dataset", "shapes", "--set", "method.unfreeze_blocks=1",
        ],
        "prompts (paper), rendered images": [
            "--student-model", STUDENT, "--unlabeled-folder", str(rendered / "images"), "--classnames",
            str(rendered / "classnames.txt"), "--eval-dataset", "shapes",
        ],
        "timm CNN test_convnext3 (random init)": timm("test_convnext3", args.timm_epochs),
        "timm CNN test_byobnet (random init)": timm("test_byobnet", args.cnn_epochs),
        "timm ViT test_vit p4 (random init)": timm("test_vit", args.timm_epochs, "--student-kwargs", "patch_size=4"),
    }  # fmt: skip
    rows: dict[str, list[dict[str, float]]] = {}
    for name, extra in students.items():
        if args.only and not any(o in name for o in args.only):
            continue
        cache = out / ("cache_rendered" if "--unlabeled-folder" in extra else "cache_train")
        for seed in args.seeds:
            slug = name.replace(" (random init)", "").replace("(paper)", "").replace(",", "").replace("+", "")
            folder = out / "_".join(slug.split()) / f"seed_{seed}"
            if not (folder / "prompts.safetensors").is_file() or not halves(folder):
                sets = [*extra, "--set", *quiet] if "--set" not in extra else [*extra, *quiet]
                distill([*teacher, *sets, "--teacher-cache", str(cache), "--seed", str(seed), "--out", str(folder)])
            rows.setdefault(name, []).append({**halves(folder), "folder": str(folder)})

    # inductive: base-class train images (links), base-class features, then the novel names added afterwards
    from promptkd.data.sampling import subsample_classes

    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    links = out / "base_images"
    if not links.is_dir():
        links.mkdir()
        for k, datum in enumerate(base.train):
            os.symlink(datum.path, links / f"{k:05d}{Path(datum.path).suffix}")
    (out / "base.txt").write_text("\n".join(base.classnames) + "\n")
    (out / "new.txt").write_text("\n".join(new.classnames) + "\n")
    from promptkd.cli.main import main as cli
    from promptkd.data.transforms import build_transform
    from promptkd.distill.run import evaluate_halves
    from promptkd.methods.promptkd import PromptKD

    extend_rows = []
    if not args.only or any("extend" in o for o in args.only):
        for seed in args.seeds:
            folder = out / "inductive_extend" / f"seed_{seed}"
            if not (folder / "prompts.safetensors").is_file():
                distill(
                    [*teacher, "--student-model", STUDENT, "--unlabeled-folder", str(links), "--classnames",
                     str(out / "base.txt"), "--no-eval", "--seed", str(seed), "--out", str(folder), "--set", *quiet]
                )  # fmt: skip
            extended = folder / "features_extended"
            if not extended.with_suffix(".json").is_file():
                cli(["features", "extend", str(folder / "teacher_features"), "--teacher", args.teacher, "--classes",
                     str(out / "new.txt"), "--out", str(extended)])  # fmt: skip
            student = PromptKD.from_checkpoint(folder / "prompts", extended.with_suffix(".safetensors"))
            transform = build_transform(student.backbone.preprocess, train=False)
            scored = evaluate_halves(student, splits, ["base", "new", "all"], transform)
            row = {half: 100 * m["acc1"] for half, _, m, _, _ in scored}
            extend_rows.append({**row, "new_among_all": novel_among_all(student, new, transform)})

    # speed and size of each student (seed 1) against the teacher, in one interleaved measurement
    from promptkd.deploy import export_student, load_for_inference
    from promptkd.evaluation.world_report import images_per_second

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    teacher_method = load_for_inference(args.teacher)
    firsts = {name: load_for_inference(Path(r[0]["folder"]) / "prompts") for name, r in rows.items()}
    rates = images_per_second([teacher_method, *firsts.values()])
    summary = {"teacher_images_per_second": rates[0], "students": {}, "inductive_extend": extend_rows}
    for (name, method), rate in zip(firsts.items(), rates[1:]):
        onnx_dir = Path(rows[name][0]["folder"]) / "onnx"
        if not (onnx_dir / "student.onnx").is_file():
            export_student(Path(rows[name][0]["folder"]) / "prompts", onnx_dir, fmt="onnx")
        deployable = method.deployable()
        summary["students"][name] = {
            "seeds": rows[name],
            "parameters": sum(p.numel() for p in deployable.parameters()),
            "images_per_second": rate,
            "onnx_bytes": (onnx_dir / "student.onnx").stat().st_size,
        }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    print("| student | base | novel | HM | all classes | parameters | images/s (x teacher) | ONNX |")
    print("|---|---|---|---|---|---|---|---|")
    for name, info in summary["students"].items():
        seeds = info["seeds"]
        b, n, a = (mean([s[k] for s in seeds]) for k in ("base", "new", "all"))
        hm = mean([s["hm"] for s in seeds])
        speed = info["images_per_second"]
        print(
            f"| {name} | {b:.1f} | {n:.1f} | {hm:.1f} | {a:.1f} | {info['parameters'] / 1e3:.0f} k | "
            f"{speed:.0f} ({speed / summary['teacher_images_per_second']:.1f}x) | {info['onnx_bytes'] / 1e6:.2f} MB |"
        )
    if extend_rows:
        b, n, na, a = (mean([r[k] for r in extend_rows]) for k in ("base", "new", "new_among_all", "all"))
        print(f"\ninductive (base images + base features) then extended with the novel names: base {b:.1f}, "
              f"novel {n:.1f} among the novel names but {na:.1f} among all names (what predict does), all "
              f"{a:.1f} ({len(extend_rows)} seeds); calibration and a short distillation: "
              "scripts/world_extend.py")  # fmt: skip


def novel_among_all(student, new, transform) -> float:
    """Accuracy on the novel classes' test images scored among every name the student holds (base and novel), as
    `predict` scores them: the figure the novel-only one hides when base rows outscore the added ones."""
    from promptkd.data.items import Datum, ImageDataset
    from promptkd.engine.trainer import predict_logits

    names = list(student.classnames)
    test = [Datum(d.path, names.index(d.classname), d.classname) for d in new.test]
    logits, labels = predict_logits(student, ImageDataset(test, transform))
    return 100 * (logits.argmax(-1) == labels).float().mean().item()


if __name__ == "__main__":
    main()
