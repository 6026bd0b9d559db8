"""What the plug-ins cost: the extra training time of ATPrompt's search and of DPC's stage, and inference speed.

On the world (``shapes``, 16 shots of the base classes, seed 1, the ``world`` presets, ``pkd-world-student``), in one
run: CoOp's training (the baseline), CoOp with two attributes, ``promptkd attribute-search`` (its defaults: 2
attributes at most, 40 epochs) and the DPC stage over the CoOp prompt; then inference images/s on the test images
held in memory (image tower + logits over all 64 classes, batch 256): CoOp against DPC over it, and a PromptKD
student against DPC over it (weights 0.2 / 0.0, so base and new classes take different projectors).

    python benchmarks/plugin_costs.py [--out runs/bench_plugins] [--repeats 5] [--inference-only]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def train(out: Path, method: str, root: str, overrides: list[str]) -> float:
    from promptkd.engine.run import resolve_run_config, run_training

    base = {"dataset": "shapes", "data_root": root, "shots": 16, "subsample": "base", "seed": 1, "out": str(out)}
    config = resolve_run_config(method, "world", ["train.progress=false", *overrides], base)
    return timed(lambda: run_training(config))


def search(out: Path, root: str) -> float:
    from promptkd.cli.main import main

    argv = ["attribute-search", "--dataset", "shapes", "--data-root", root, "--preset", "world", "--out", str(out)]
    return timed(lambda: main(argv))


def images_per_second(methods: dict[str, object], images: torch.Tensor, repeats: int, batch: int = 256):
    """Best-of-``repeats`` images/s of each method, the methods taking turns within every repeat (so a slower spell
    of a shared machine falls on all of them)."""

    def run(method):
        with torch.no_grad():
            for start in range(0, len(images), batch):
                method.logits(images[start : start + batch])

    for method in methods.values():
        run(method)  # warm: class features cached, kernels chosen
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, method in methods.items():
            best[name] = min(best[name], timed(lambda method=method: run(method)))
    return {name: len(images) / seconds for name, seconds in best.items()}


def test_images(root: str, backbone) -> tuple[torch.Tensor, list[str]]:
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import ImageDataset
    from promptkd.data.transforms import build_transform

    splits = resolve_dataset("shapes", root)
    data = ImageDataset(splits.test, build_transform(backbone.preprocess, train=False))
    return torch.stack([data[i][0] for i in range(len(data))]), list(splits.classnames)


def student_pair(backbone, classnames: list[str], base: list[str], out: Path):
    """A PromptKD student (random stored features: speed only) and DPC over it."""
    import torch.nn.functional as F

    from promptkd.distill.teacher import TeacherFeatures
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from
    from promptkd.methods.dpc import DPC, DPCConfig

    cls = get_method("promptkd")
    features = TeacherFeatures(
        F.normalize(torch.randn(len(classnames), backbone.embed_dim), dim=-1), 100.0, classnames, {"method": "zeroshot"}
    )
    from promptkd.config import load_preset

    student = cls(
        backbone, base, config_from(cls, load_preset("promptkd", "world").get("method", {})), features=features
    )
    student.eval().save(out / "prompts")
    features.save(out / "teacher_features")
    stage = DPC(backbone, base, DPCConfig(base=str(out), weight_base=0.2, weight_new=0.0)).eval()
    student.set_classnames(classnames)
    stage.set_classnames(classnames)
    return student, stage


def main() -> None:
    from promptkd.backbones import load_backbone
    from promptkd.backbones.weights import shipped_weights
    from promptkd.data.world import ensure_world
    from promptkd.deploy import load_for_inference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_plugins")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inference-only", action="store_true", help="reuse the checkpoints of an earlier run")
    args = parser.parse_args()
    out = Path(args.out)
    root = str(ensure_world(None))
    torch.manual_seed(0)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    if not args.inference_only:
        seconds = {
            "CoOp (baseline)": train(out / "coop", "coop", root, []),
            "CoOp + ATPrompt (2 attributes)": train(
                out / "coop_atp", "coop", root, ["method.attributes=[background, type]"]
            ),
            "attribute search (defaults)": search(out / "search", root),
            "DPC stage over the CoOp prompt": train(out / "dpc", "dpc", root, [f"method.base={out / 'coop'}"]),
        }
        base_seconds = seconds["CoOp (baseline)"]
        print("\n| stage (train + test) | seconds | vs CoOp |\n|---|---|---|")
        for name, value in seconds.items():
            print(f"| {name} | {value:.1f} | {value / base_seconds:.2f}x |")

    backbone = load_backbone("pkd-world-student", shipped_weights("pkd-world-student"))
    images, classnames = test_images(root, backbone)
    coop = load_for_inference(out / "coop" / "prompts")
    dpc = load_for_inference(out / "dpc" / "prompts")
    base = list(coop.classnames)
    coop.set_classnames(classnames)
    dpc.set_classnames(classnames)
    student, student_dpc = student_pair(backbone, classnames, base, out / "student")
    rates = images_per_second(
        {"CoOp": coop, "DPC over CoOp": dpc, "PromptKD student": student, "DPC over the student": student_dpc},
        images,
        args.repeats,
    )
    print(f"\n| inference, {len(images)} images x {len(classnames)} classes | img/s | vs its base |\n|---|---|---|")
    for name, value in rates.items():
        reference = rates["CoOp"] if "CoOp" in name else rates["PromptKD student"]
        print(f"| {name} | {value:,.0f} | {value / reference:.2f}x |")


if __name__ == "__main__":
    main()
