"""Deployed inference end to end (decode -> predict -> CSV, images/s), teacher vs student in PyTorch and ONNX.

In one run, on one machine, with the same loader (``promptkd predict``'s streaming path: ``--workers`` decoding
processes, batches in order, the CSV written batch by batch) for every model:

- the world pair (``shapes``): a PromptSRC teacher on ``pkd-world-teacher`` (16 shots of the base classes, its world
  preset) and a PromptKD student on ``pkd-world-student`` distilled from it on the unlabelled train split (no label);
  end-to-end images/s on the test split's images for the teacher (PyTorch fp32), the student in PyTorch fp32, the
  exported student in ONNX Runtime fp32 and int8 (``promptkd export --quantize int8``), and the HM (base-to-novel)
  and all-class accuracy of each on the test split;
- ViT-B/16 student vs ViT-L/14 teacher (random weights, 224 px, fewer images): the same four engines.

Ratios are against the teacher measured in the same run. On the world each engine is timed in its own Python process
(as ``promptkd predict`` runs it; engines sharing a process disturb each other's thread pools), warmed on one batch,
the engines taking turns in each of ``--rounds`` rounds, at each ``--batch-size``; the median is reported. Given
checkpoints (``--teacher`` / ``--student``) are used as they are; otherwise the pair is trained in ``--work`` (reused
by later runs).

    python benchmarks/e2e_deploy.py [--work /tmp/e2e_deploy] [--workers 1] [--batch-size 64 256] [--rounds 5]
                                    [--repeat 3] [--student-epochs 4] [--vit-images 16] [--skip-vit]
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
            label = " at batch ".join(map(str, name)) if isinstance(name, tuple) else name
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
    return OnnxPredictor(spec["path"])


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

    predictor = build_predictor(json.loads(args.time_one))
    size = args.batch_size[0]
    first = Path(args.list).read_text(encoding="utf-8").split("\n")[:size]
    for batch in decoded_batches(first, predictor.transform, batch_size=size, expand=False):
        predictor.logits(batch.images)
    print(end_to_end(predictor, Path(args.list), args.n, Path(args.out_csv), size, args.workers))


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


def exports(student: str, work: Path, calibration, features: str | None = None, count: int = 64) -> dict[str, Path]:
    """The student exported as ONNX fp32 and int8 (the int8 check's agreement is reported, not enforced here)."""
    from promptkd.deploy import export_student

    folders = {"onnx": work / "onnx-fp32", "int8": work / "onnx-int8"}
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
    print(f"  int8 export: top-1 agreement with fp32 {100 * check['top1_agreement']:.2f}% on {check['images']} images")
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


def world_part(args, work: Path) -> None:
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.sampling import base_new_labels
    from promptkd.data.world import ensure_world

    root = str(ensure_world())
    split = resolve_dataset("shapes", root)
    t0 = time.perf_counter()
    teacher_ckpt, student_ckpt = (args.teacher, args.student)
    if not (teacher_ckpt and student_ckpt):
        teacher_ckpt, student_ckpt = world_pair(work / "world", root, args.student_epochs)
    print(f"world pair ready in {time.perf_counter() - t0:.0f} s: teacher {teacher_ckpt}, student {student_ckpt}")
    folders = exports(student_ckpt, work / "world", "shapes")
    paths, labels = [d.path for d in split.test], [d.label for d in split.test]
    list_file = work / "world" / "test.txt"
    list_file.write_text("\n".join(paths * args.repeat) + "\n")  # a longer pass: worker start-up amortised
    base = base_new_labels({d.label for d in split.train})[0]
    specs = {
        "teacher, PyTorch fp32": {"kind": "teacher", "path": teacher_ckpt, "dataset": "shapes"},
        "student, PyTorch fp32": {"kind": "torch", "path": student_ckpt},
        "student, ONNX fp32": {"kind": "onnx", "path": str(folders["onnx"])},
        "student, ONNX int8": {"kind": "onnx", "path": str(folders["int8"])},
    }
    predictors = {name: build_predictor(spec) for name, spec in specs.items()}
    for name, predictor in predictors.items():
        assert list(predictor.classnames) == list(split.classnames), name
    csv_file, n = work / "pred.csv", len(paths) * args.repeat
    measures = {
        (name, size): in_own_process(spec, list_file, n, csv_file, size, args.workers)
        for size in args.batch_size
        for name, spec in specs.items()
    }
    rates = in_turns(measures, args.rounds)
    accuracies = {name: accuracy(p, paths, labels, base) for name, p in predictors.items()}
    for size in args.batch_size:
        table(
            f"world `shapes` test split ({len(paths)} PNG images of 32 px, {args.repeat} passes), batch {size}, "
            f"{args.workers} decoding worker(s), "
            f"median of {args.rounds} rounds, HM on the same images:",
            [(name, rates[name, size], accuracies[name]) for name in specs],
        )
    goal(rates, accuracies, next(iter(specs)))


def goal(rates: dict, accuracies: dict, teacher: str) -> None:
    """The goal line: each model at its fastest batch size, the fastest student against the teacher."""
    best = {name: max(rate for (n, _), rate in rates.items() if n == name) for name in accuracies}
    student = max((name for name in best if name != teacher), key=best.get)
    speed, share = best[student] / best[teacher], accuracies[student]["hm"] / accuracies[teacher]["hm"]
    met = "met" if speed >= 5 and share >= 0.9 else "not met"
    print(
        f"\ngoal (deployed student >= 5x the teacher's end-to-end images/s at >= 90% of its HM, each at its fastest "
        f"batch): {met} — '{student}' at {speed:.2f}x and {100 * share:.0f}% of the teacher's HM"
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
            name: functools.partial(end_to_end, p, list_file, n, work / "pred.csv", 8, args.workers)
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
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256], help="world batch sizes to time")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (0: in-process)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the world test images per timing")
    parser.add_argument("--rounds", type=int, default=5, help="world timing rounds (models in turns; median)")
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
