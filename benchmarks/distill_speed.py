"""PromptKD distillation speed: pre-stored teacher text features vs re-encoding them every step (reference code).

For a student/teacher pair, in one run and on one machine, it times:
  A. student forward + backward + optimiser step alone (KD loss against fixed targets),
  B. teacher image forward alone (no grad),
  C. a full PromptKD step with the stored teacher text features (ours),
  D. the same step re-encoding the teacher's class text features every step (what the reference code does),
and reports C / (A + B) (target <= 1.10: pre-storing makes the text branch free), D / C, images/s and peak memory
(each case runs in its own process, so peak RSS is that case's own). Then student vs teacher inference images/s.

    python benchmarks/distill_speed.py --pair world            # embedded pair, 32 px (shipped weights)
    python benchmarks/distill_speed.py --pair vit --classes 37 # ViT-B/16 student + ViT-L/14 teacher, 224 px, random
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time

import torch

PAIRS = {
    "world": {
        "student": "pkd-world-student",
        "teacher": "pkd-world-teacher",
        "depth_s": 3,
        "depth_t": 2,
        "batch": 32,
        "steps": 10,
    },
    "vit": {"student": "ViT-B-16", "teacher": "ViT-L-14", "depth_s": 9, "depth_t": 9, "batch": 4, "steps": 2},
}


def _build(pair: dict, classes: int, precision: str):
    from promptkd.backbones import load_backbone
    from promptkd.backbones.weights import shipped_weights
    from promptkd.distill.teacher import Teacher
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from
    from promptkd.methods.promptkd import PromptKD, PromptKDConfig

    torch.manual_seed(0)
    names = [f"class {i}" for i in range(classes)]
    teacher_backbone = load_backbone(pair["teacher"], shipped_weights(pair["teacher"]), precision=precision)
    src = get_method("promptsrc")
    teacher_method = src(
        teacher_backbone,
        names,
        config_from(
            src,
            {
                "text_depth": min(pair["depth_t"], teacher_backbone.text_layers),
                "vision_depth": min(pair["depth_t"], teacher_backbone.vision_layers),
            },
        ),
    )
    identity = {"method": "promptsrc", "backbone": teacher_backbone.spec.to_dict(), "prompts_sha256": "benchmark"}
    teacher = Teacher(teacher_method, identity, loaded=True)
    student_backbone = load_backbone(pair["student"], shipped_weights(pair["student"]), precision=precision)
    student = PromptKD(student_backbone, names, PromptKDConfig(vision_depth=pair["depth_s"]), teacher=teacher)
    return student, teacher, names


def _case(queue, case: str, pair_name: str, classes: int, precision: str, steps: int, batch: int):
    torch.set_num_threads(torch.get_num_threads())
    from promptkd.backbones import autocast_for
    from promptkd.methods.base import Batch
    from promptkd.methods.promptkd import kd_loss

    pair = PAIRS[pair_name]
    student, teacher, names = _build(pair, classes, precision)
    size = student.backbone.image_size
    images = torch.randn(batch, 3, size, size)
    params = student.trainable_parameters()
    optim = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    targets = torch.randn(batch, classes)
    student.train()

    def step():
        if case == "student":
            loss = kd_loss(student.logits(images), targets, 1.0, "batch", 1.0)
        elif case == "teacher":
            with torch.no_grad():
                teacher.image_features(student._teacher_input(images))
            return
        elif case == "stored":
            loss = student.training_step(Batch(images)).loss
        elif case == "recompute":
            features = teacher.text_features(names)  # the reference's per-step text pass over all classes
            with torch.no_grad():
                t_logits = teacher.logits(student._teacher_input(images), features, teacher.logit_scale())
            loss = kd_loss(student.logits(images), t_logits, 1.0, "batch", 1.0)
        elif case == "infer_student":
            with torch.no_grad():
                student.logits(images)
            return
        elif case == "infer_teacher":
            with torch.no_grad():
                teacher.logits(student._teacher_input(images), student.text_features, teacher.logit_scale())
            return
        optim.zero_grad()
        loss.backward()
        optim.step()

    with autocast_for(precision, "cpu"):
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
    queue.put(
        {
            "case": case,
            "seconds_per_step": seconds,
            "images_per_second": batch / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def run_case(case: str, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    pair = PAIRS[args.pair]
    process = ctx.Process(
        target=_case,
        args=(
            queue,
            case,
            args.pair,
            args.classes,
            args.precision,
            args.steps or pair["steps"],
            args.batch or pair["batch"],
        ),
    )
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="world")
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    pair = PAIRS[args.pair]
    print(
        f"machine: {platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; pair {pair['student']} <- {pair['teacher']}, {args.classes} classes, batch "
        f"{args.batch or pair['batch']}, {args.precision}"
    )
    results = {
        case: run_case(case, args)
        for case in ("student", "teacher", "stored", "recompute", "infer_student", "infer_teacher")
    }
    floor = results["student"]["seconds_per_step"] + results["teacher"]["seconds_per_step"]
    print("\n| case | s/step | images/s | peak RSS (MB) |\n|---|---|---|---|")
    labels = {
        "student": "A. student fwd+bwd alone",
        "teacher": "B. teacher image forward alone",
        "stored": "C. PromptKD step, stored text features",
        "recompute": "D. step re-encoding teacher text",
        "infer_student": "student inference",
        "infer_teacher": "teacher inference (stored text)",
    }
    for case, r in results.items():
        print(
            f"| {labels[case]} | {r['seconds_per_step']:.3f} | {r['images_per_second']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    ratio = results["stored"]["seconds_per_step"] / floor
    recompute = results["recompute"]["seconds_per_step"] / results["stored"]["seconds_per_step"]
    inference = results["infer_student"]["images_per_second"] / results["infer_teacher"]["images_per_second"]
    print(
        f"\nC / (A + B) = {ratio:.3f} (target <= 1.10); D / C = {recompute:.2f}x; "
        f"student inference {inference:.1f}x the teacher's images/s"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results, "ratio_stored_over_floor": ratio}, handle, indent=2)


if __name__ == "__main__":
    main()
