"""Deployed inference end to end (decode -> predict -> CSV, images/s), teacher vs student in PyTorch and ONNX.

In one run, on one machine, with the same loader (``promptkd predict``'s streaming path: ``--workers`` decoding
processes, batches in order, the CSV written batch by batch) for every model:

- the world pair (``shapes``): a PromptSRC teacher on ``pkd-world-teacher`` (16 shots of the base classes, its world
  preset) and a PromptKD student on ``pkd-world-student`` distilled from it on the unlabelled train split (no label);
  end-to-end images/s on the test split's images for the teacher (PyTorch fp32), the student in PyTorch fp32, the
  exported student in ONNX Runtime fp32 and int8 (``promptkd export --quantize int8``), and the HM (base-to-novel)
  and all-class accuracy of each on the test split;
- a timm CNN student on the same world (``timm:test_byobnet`` from random weights, distilled from the same teacher
  on ``--cnn-images`` unlabelled images rendered for it, ``promptkd world-render``): in PyTorch fp32 and in ONNX fp32
  and int8. A CLIP-shaped student keeps CLIP's tower (4.9x fewer multiply-adds than the world teacher, so it cannot
  reach 5x end to end); "any student" lets a small CNN take its place, and this row measures what that buys;
- ViT-B/16 student vs ViT-L/14 teacher (random weights, 224 px, fewer images): the same four engines.

Ratios are against the teacher measured in the same run. On the world each engine is timed in its own Python process
(as ``promptkd predict`` runs it; engines sharing a process disturb each other's thread pools), warmed on one batch,
the engines taking turns in each of ``--rounds`` rounds, at each ``--batch-size`` and number of decoding ``--workers``;
the median is reported, and the goal line compares each model at its own fastest setting. Given checkpoints
(``--teacher`` / ``--student`` / ``--cnn-student``) are used as they are; otherwise they are trained in ``--work``
(reused by later runs).

    python benchmarks/e2e_deploy.py [--work /tmp/e2e_deploy] [--workers 0 1] [--batch-size 64 256] [--rounds 3]
                                    [--repeat 3] [--student-epochs 4] [--cnn-epochs 30] [--cnn-images 10000]
                                    [--vit-images 16] [--skip-vit]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

WORLD_TEACHER = "pkd-world-teacher"
WORLD_STUDENT = "pkd-world-student"
CNN_STUDENT = "timm:test_byobnet"


def machine() -> str:
    """The CPU by name and by what matters for int8 (AVX-512 VNNI / AVX2), its cores, the load when measured."""
    flags, name = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = next((f for f in ("avx512_vnni", "avx512f", "avx2") if f in flags), "no AVX2")
    import onnxruntime

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"machine: {name}, {isa}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), onnxruntime {onnxruntime.__version__}; load average {load:.1f} at start"
    )


# --- the world pair ---------------------------------------------------------------------------------------------------
def world_pair(work: Path, root: str, student_epochs: int) -> tuple[str, str]:
    """A PromptSRC teacher (world preset) and a PromptKD student distilled from it (world preset, fewer epochs)."""
    from promptkd.distill.run import resolve_distill_config, run_distillation
    from promptkd.engine.run import resolve_run_config, run_training

    teacher = work / "teacher" / "prompts.safetensors"
    if not teacher.is_file():
        data = {"dataset": "shapes", "data_root": root, "model": WORLD_TEACHER, "pretrained": "shipped"}
        run_training(
            resolve_run_config(
                "promptsrc", "world", ["train.progress=false"], {**data, "out": str(teacher.parent), "evaluate": False}
            )
        )
    student = work / f"student-{student_epochs}ep" / "prompts.safetensors"
    if not student.is_file():
        config = {
            "teacher": str(teacher),
            "student_model": WORLD_STUDENT,
            "dataset": "shapes",
            "data_root": root,
            "out": str(student.parent),
            "evaluate": False,
        }
        overrides = [f"train.epochs={student_epochs}", "train.progress=false"]
        run_distillation(resolve_distill_config("world", overrides, config))
    return str(teacher), str(student)


def cnn_student(work: Path, teacher: str, epochs: int, images: int) -> str:
    """A timm CNN student from random weights, distilled from the world teacher on freshly rendered unlabelled
    images (no label; the test split only scores it), through ``promptkd distill`` as a user runs it."""
    from promptkd.cli.main import main as promptkd
    from promptkd.data.world import render_unlabeled

    student = work / f"cnn-{epochs}ep-{images}" / "prompts.safetensors"
    if not student.is_file():
        rendered = render_unlabeled("shapes", images, work / f"unlabeled-{images}", seed=1)
        command = ["distill", "--teacher", teacher, "--preset", "world", "--student", CNN_STUDENT]
        command += ["--student-pretrained", "random", "--unlabeled-folder", str(rendered / "images")]
        command += ["--classnames", str(rendered / "classnames.txt"), "--teacher-cache", str(work / "cnn-cache")]
        command += ["--seed", "1", "--out", str(student.parent), "--no-eval"]
        command += ["--set", f"train.epochs={epochs}", "--set", "train.progress=false"]
        if promptkd(command) != 0:
            raise SystemExit(f"distilling the CNN student failed: promptkd {' '.join(command)}")
    return str(student)


def teacher_over(checkpoint: str, classnames: list[str]):
    """The teacher's method scoring every class (it was trained on the base half's names; its prompts are not
    tied to names)."""
    from promptkd.backbones import load_recorded_backbone
    from promptkd.checkpoints import load_checkpoint
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    _, meta = load_checkpoint(checkpoint)
    cls = get_method(meta["method"])
    method = cls(load_recorded_backbone(meta["backbone"]), classnames, config_from(cls, meta.get("method_config")))
    method.load(checkpoint, check_classnames=False)
    return method.eval()


# --- measurements -----------------------------------------------------------------------------------------------------
def end_to_end(predictor, list_file: Path, n: int, out: Path, batch_size: int, workers: int) -> float:
    """Images/s through the whole ``promptkd predict`` path: walk the list, decode, predict, write the CSV."""
    from promptkd.deploy import PredictionsCSV, iter_predictions

    start = time.perf_counter()
    batches = iter_predictions(
        predictor, [list_file], top_k=5, batch_size=batch_size, workers=workers, progress=False, total=n
    )
    with PredictionsCSV(out, min(5, len(predictor.classnames))) as csv:
        for batch in batches:
            csv.write(batch)
    return n / (time.perf_counter() - start)


def in_turns(measures: dict, rounds: int) -> dict:
    """Each model's median images/s over ``rounds`` rounds, the models taking turns within a round: a machine whose
    speed drifts (shared cores) moves every model's figure alike instead of the one that ran during the slow spell."""
    seen: dict = {name: [] for name in measures}
    for round_number in range(rounds):
        for name, measure in measures.items():
            seen[name].append(measure())
            label = f"{name[0]} at (batch, workers) {name[1]}" if isinstance(name, tuple) else name
            print(f"  round {round_number + 1}, {label}: {seen[name][-1]:,.1f} img/s", flush=True)
    return {name: statistics.median(values) for name, values in seen.items()}


# --- one engine in its own process, as `promptkd predict` runs it ---------------------------------------------------
def build_predictor(spec: dict):
    """A predictor from a JSON-able description: the world teacher over every class, a student checkpoint in
    PyTorch, or an ONNX export folder."""
    from promptkd.deploy import OnnxPredictor, TorchPredictor, load_for_inference

    if spec["kind"] == "teacher":
        from promptkd.data.datasets import resolve_dataset
        from promptkd.data.world import ensure_world

        classnames = list(resolve_dataset(spec["dataset"], str(ensure_world())).classnames)
        return TorchPredictor(teacher_over(spec["path"], classnames))
    if spec["kind"] == "torch":
        return TorchPredictor(load_for_inference(spec["path"]))
    return OnnxPredictor(spec["path"], beside_decoders=spec.get("workers", 0) > 0)  # as `promptkd predict` builds it


def in_own_process(spec: dict, list_file: Path, n: int, out: Path, batch_size: int, workers: int):
    """A measurement that runs one engine in a fresh Python process (its start and model load not timed): engines
    sharing one process disturb each other's thread pools, which no deployment does."""

    def measure() -> float:
        command = [sys.executable, __file__, "--time-one", json.dumps(spec), "--list", str(list_file), "--n", str(n)]
        command += ["--out-csv", str(out), "--batch-size", str(batch_size), "--workers", str(workers)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        return float(done.stdout.strip().splitlines()[-1])

    return measure


def time_one(args) -> None:
    """The child process: load the engine, warm it on one batch (first-call set-up is not images/s), time a pass."""
    from promptkd.deploy import decoded_batches

    predictor = build_predictor({**json.loads(args.time_one), "workers": args.workers[0]})
    size = args.batch_size[0]
    first = Path(args.list).read_text(encoding="utf-8").split("\n")[:size]
    for batch in decoded_batches(first, predictor.transform, batch_size=size, expand=False):
        predictor.logits(batch.images)
    print(end_to_end(predictor, Path(args.list), args.n, Path(args.out_csv), size, args.workers[0]))


def accuracy(predictor, paths: list[str], labels: list[int], base: list[int]) -> dict[str, float]:
    """All-class accuracy and HM (base images scored among the base classes, novel among the novel ones)."""
    from promptkd.deploy import decoded_batches
    from promptkd.evaluation.metrics import harmonic_mean

    logits = torch.cat(
        [
            predictor.logits(b.images)
            for b in decoded_batches(paths, predictor.transform, batch_size=256, workers=0, expand=False)
        ]
    ).float()
    y = torch.tensor(labels)
    out = {"all": float((logits.argmax(-1) == y).float().mean())}
    novel = [c for c in range(logits.shape[1]) if c not in set(base)]
    for name, group in (("base", base), ("novel", novel)):
        rows = torch.tensor([label in set(group) for label in labels])
        picked = torch.tensor(group)[logits[rows][:, group].argmax(-1)]
        out[name] = float((picked == y[rows]).float().mean())
    out["hm"] = harmonic_mean(out["base"], out["novel"])
    return out


def exports(
    student: str, work: Path, calibration, features: str | None = None, count: int = 64, prefix: str = ""
) -> dict[str, Path]:
    """The student exported as ONNX fp32 and int8 (the int8 check's agreement is reported, not enforced here)."""
    from promptkd.deploy import export_student

    folders = {"onnx": work / f"{prefix}onnx-fp32", "int8": work / f"{prefix}onnx-int8"}
    export_student(student, folders["onnx"], features, fmt="onnx")
    manifest = export_student(
        student,
        folders["int8"],
        features,
        fmt="onnx",
        quantize="int8",
        calibration=calibration,
        calibration_count=count,
        min_agreement=1e-6,
    )
    check = manifest["quantization"]["check"]
    agreement = 100 * check["top1_agreement"]
    print(f"  {prefix}int8 export: top-1 agreement with fp32 {agreement:.2f}% on {check['images']} images")
    return folders


def table(title: str, rows: list[tuple[str, float, dict | None]]) -> None:
    teacher = rows[0][1]
    print(f"\n{title}\n| model | end-to-end img/s | vs teacher | HM | all-class acc | HM vs teacher |")
    print("|---|---|---|---|---|---|")
    t_hm = rows[0][2]["hm"] if rows[0][2] else None
    for name, rate, acc in rows:
        hm = f"{100 * acc['hm']:.1f}" if acc else "—"
        share = f"{100 * acc['hm'] / t_hm:.0f}%" if acc and t_hm else "—"
        all_acc = f"{100 * acc['all']:.1f}" if acc else "—"
        shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
        print(f"| {name} | {shown} | {rate / teacher:.2f}x | {hm} | {all_acc} | {share} |")


def world_checkpoints(args, work: Path, root: str) -> dict[str, str]:
    """The teacher, the CLIP-shaped student and the CNN student: given, or trained (and reused) in ``work``."""
    t0 = time.perf_counter()
    teacher, student = (args.teacher, args.student)
    if not (teacher and student):
        teacher, student = world_pair(work, root, args.student_epochs)
    cnn = args.cnn_student or cnn_student(work, teacher, args.cnn_epochs, args.cnn_images)
    print(f"world models ready in {time.perf_counter() - t0:.0f} s: teacher {teacher}, student {student}, CNN {cnn}")
    return {"teacher": teacher, "student": student, "cnn": cnn}


def world_specs(checkpoints: dict[str, str], work: Path) -> dict[str, dict]:
    """Every world engine as a JSON-able description (the student exports written on the way)."""
    clip, cnn = (exports(checkpoints[k], work, "shapes", prefix=p) for k, p in (("student", ""), ("cnn", "cnn-")))
    return {
        "teacher, PyTorch fp32": {"kind": "teacher", "path": checkpoints["teacher"], "dataset": "shapes"},
        "student, PyTorch fp32": {"kind": "torch", "path": checkpoints["student"]},
        "student, ONNX fp32": {"kind": "onnx", "path": str(clip["onnx"])},
        "student, ONNX int8": {"kind": "onnx", "path": str(clip["int8"])},
        "CNN student, PyTorch fp32": {"kind": "torch", "path": checkpoints["cnn"]},
        "CNN student, ONNX fp32": {"kind": "onnx", "path": str(cnn["onnx"])},
        "CNN student, ONNX int8": {"kind": "onnx", "path": str(cnn["int8"])},
    }


def world_part(args, work: Path) -> None:
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.sampling import base_new_labels
    from promptkd.data.world import ensure_world

    root = str(ensure_world())
    split = resolve_dataset("shapes", root)
    specs = world_specs(world_checkpoints(args, work / "world", root), work / "world")
    paths, labels = [d.path for d in split.test], [d.label for d in split.test]
    list_file = work / "world" / "test.txt"
    list_file.write_text("\n".join(paths * args.repeat) + "\n")  # a longer pass: worker start-up amortised
    base = base_new_labels({d.label for d in split.train})[0]
    accuracies = {}
    for name, spec in specs.items():
        predictor = build_predictor(spec)
        assert list(predictor.classnames) == list(split.classnames), name
        accuracies[name] = accuracy(predictor, paths, labels, base)
        del predictor
    csv_file, n = work / "pred.csv", len(paths) * args.repeat
    settings = [(size, workers) for size in args.batch_size for workers in args.workers]
    measures = {
        (name, setting): in_own_process(spec, list_file, n, csv_file, *setting)
        for setting in settings
        for name, spec in specs.items()
    }
    rates = in_turns(measures, args.rounds)
    best = {name: max(rates[name, setting] for setting in settings) for name in specs}
    print(
        f"\nworld `shapes` test split ({len(paths)} PNG images of 32 px, {args.repeat} passes per timing), end-to-end "
        f"images/s at (batch, decoding workers), median of {args.rounds} rounds; HM on the same images:"
    )
    world_table(rates, best, accuracies, settings)
    goal(best, accuracies, next(iter(specs)))


def world_table(rates: dict, best: dict, accuracies: dict, settings: list[tuple[int, int]]) -> None:
    """One row per engine: images/s at each setting, its fastest against the teacher's fastest, its accuracy."""
    teacher = next(iter(accuracies))
    heads = " | ".join(f"b{size} w{workers}" for size, workers in settings)
    print(f"| model | {heads} | fastest vs teacher's | HM | all-class acc | HM vs teacher |")
    print("|---|" + "---|" * (len(settings) + 4))
    for name, acc in accuracies.items():
        cells = " | ".join(
            f"**{rates[name, s]:,.0f}**" if rates[name, s] == best[name] else f"{rates[name, s]:,.0f}" for s in settings
        )
        share = acc["hm"] / accuracies[teacher]["hm"]
        print(
            f"| {name} | {cells} | {best[name] / best[teacher]:.2f}x | {100 * acc['hm']:.1f} | {100 * acc['all']:.1f} "
            f"| {100 * share:.0f}% |"
        )


def goal(best: dict, accuracies: dict, teacher: str) -> None:
    """The goal line: each model at its fastest setting (``best``); the fastest student that keeps >= 90% of the
    teacher's HM (the fastest student of all when none does) against the teacher."""
    share = {name: accuracies[name]["hm"] / accuracies[teacher]["hm"] for name in accuracies}
    students = [name for name in best if name != teacher]
    keeping = [name for name in students if share[name] >= 0.9] or students
    student = max(keeping, key=best.get)
    speed = best[student] / best[teacher]
    met = "met" if speed >= 5 and share[student] >= 0.9 else "not met"
    print(
        f"\ngoal (deployed student >= 5x the teacher's end-to-end images/s at >= 90% of its HM, each at its fastest "
        f"setting): {met} — '{student}' at {speed:.2f}x and {100 * share[student]:.0f}% of the teacher's HM"
    )
    clip = [name for name in students if not name.startswith("CNN")]
    fastest_clip = max(clip, key=best.get)
    print(
        f"CLIP-shaped student at its fastest: '{fastest_clip}' at {best[fastest_clip] / best[teacher]:.2f}x and "
        f"{100 * share[fastest_clip]:.0f}% of the teacher's HM"
    )


# --- ViT-B/16 vs ViT-L/14, random weights ---------------------------------------------------------------------
def vit_part(args, work: Path) -> None:
    from promptkd.backbones import load_backbone
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.world import ensure_world
    from promptkd.deploy import CheckImages, OnnxPredictor, TorchPredictor
    from promptkd.distill.teacher import Teacher
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from
    from promptkd.methods.promptkd import PromptKD, PromptKDConfig

    torch.manual_seed(0)
    split = resolve_dataset("shapes", str(ensure_world()))
    names = list(split.classnames)
    folder = work / "vit"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = get_method("promptsrc")
    teacher_backbone = load_backbone("ViT-L-14", "random")
    teacher_method = src(teacher_backbone, names, config_from(src, {"text_depth": 9, "vision_depth": 9})).eval()
    identity = {"method": "promptsrc", "backbone": teacher_backbone.spec.to_dict(), "prompts_sha256": "benchmark"}
    features = Teacher(teacher_method, identity, loaded=True).compute_features(names)
    features_file = str(features.save(folder / "teacher_features.safetensors"))
    student = PromptKD(load_backbone("ViT-B-16", "random"), names, PromptKDConfig(vision_depth=9), features=features)
    student_ckpt = str(student.eval().save(folder / "prompts.safetensors"))
    n = args.vit_images
    paths = [split.test[i * len(split.test) // n].path for i in range(n)]
    calibration = CheckImages("world shapes test images", paths[: max(2, n // 4)], paths)
    folders = exports(student_ckpt, folder, calibration, features_file)
    print(f"ViT pair built and exported in {time.perf_counter() - t0:.0f} s")
    list_file = folder / "images.txt"
    list_file.write_text("\n".join(paths) + "\n")
    predictors = {
        "ViT-L/14 teacher, PyTorch fp32": TorchPredictor(teacher_method),
        "ViT-B/16 student, PyTorch fp32": TorchPredictor(student),
        "ViT-B/16 student, ONNX fp32": OnnxPredictor(folders["onnx"]),
        "ViT-B/16 student, ONNX int8": OnnxPredictor(folders["int8"]),
    }
    rates = in_turns(
        {
            name: functools.partial(end_to_end, p, list_file, n, work / "pred.csv", 8, args.workers[0])
            for name, p in predictors.items()
        },
        1,
    )
    rows = [(name, rates[name], None) for name in predictors]
    table(f"ViT-B/16 student vs ViT-L/14 teacher, random weights, 224 px, {n} images, batch 8:", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/e2e_deploy", help="trained pair, exports and CSVs (reused)")
    parser.add_argument("--teacher", default=None, help="a world PromptSRC teacher checkpoint (with --student)")
    parser.add_argument("--student", default=None, help="a world PromptKD student checkpoint (with --teacher)")
    parser.add_argument("--student-epochs", type=int, default=4, help="distillation epochs when training the pair")
    parser.add_argument("--cnn-student", default=None, help="a world CNN student checkpoint (else trained)")
    parser.add_argument("--cnn-epochs", type=int, default=30, help="the CNN student's distillation epochs")
    parser.add_argument("--cnn-images", type=int, default=10000, help="unlabelled images rendered for the CNN")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256], help="world batch sizes to time")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="decoding processes (0: in-process)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the world test images per timing")
    parser.add_argument("--rounds", type=int, default=3, help="world timing rounds (models in turns; median)")
    parser.add_argument("--vit-images", type=int, default=16)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--time-one", default=None, help=argparse.SUPPRESS)  # a child process: one engine's rate
    parser.add_argument("--list", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out-csv", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_one:
        return time_one(args)
    print(machine())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world_part(args, work)
    if not args.skip_vit:
        vit_part(args, work)
    print(f"\nwhole run: {time.perf_counter() - start:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
