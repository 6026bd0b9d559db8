"""Seconds per image of every test-time method against TPT, in one run per model.

Each method runs through `promptkd tta` (its `world` preset: the settings of the README's world table) in its own
process, one after the other, on the same images of `shapes_a` (the world's ImageNet-A analogue): zero-shot (TDA's
engine with both caches off: one view, no adaptation), TPT, C-TPT, TDA, DPE, BoostAdapter and ZERO. Models: the
world teacher (`pkd-world-teacher`, 32 px) and ViT-B/16 with random weights at 224 px (the same images upsampled,
`--allow-small-images`; the accuracy of random weights means nothing, only the time). It prints wall and CPU
seconds per image, the ratio TPT / method (how many times faster than TPT) and peak memory.

    python benchmarks/tta_methods_speed.py [--models world vit] [--images 64 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

METHODS = {
    "zero-shot": ["--method", "tda", "--mode", "episodic", "--set", "method.positive=false", "method.negative=false"],
    "tpt": ["--method", "tpt"],
    "ctpt": ["--method", "ctpt"],
    "tda": ["--method", "tda"],
    "dpe": ["--method", "dpe"],
    "boostadapter": ["--method", "boostadapter"],
    "zero": ["--method", "zero"],
}
MODELS = {
    "world": ["--model", "pkd-world-teacher", "--pretrained", "shipped"],
    "vit": ["--model", "ViT-B-16", "--pretrained", "random", "--allow-small-images"],
}


def measure(model: str, method: str, images: int, root: str, out: Path) -> dict:
    """One method in a fresh process; its result JSON's timing and memory."""
    folder = out / model / method
    argv = [sys.executable, "-m", "promptkd.cli.main", "tta", *METHODS[method], "--preset", "world"]
    argv += [*MODELS[model], "--datasets", "shapes_a", "--data-root", root, "--max-images", str(images)]
    argv += ["--seed", "1", "--no-progress", "--out", str(folder), "--batch-size", "4"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    (path,) = folder.glob("*-test_time_classification.json")
    metrics = json.loads(path.read_text())["metrics"]
    return {
        "wall": metrics["seconds_per_image"],
        "cpu": metrics.get("cpu_seconds_per_image", float("nan")),
        "peak_mb": metrics.get("peak_memory_mb", float("nan")),
        "acc": 100 * metrics["acc1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", nargs="+", type=int, default=[64, 4], help="images per model, in --models order")
    args = parser.parse_args()
    from promptkd.data.world import ensure_world

    root = str(ensure_world(None))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads,"
    )
    print(f"# CPU capability {torch.backends.cpu.get_cpu_capability()}, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        for model, images in zip(args.models, args.images, strict=False):
            rows = {method: measure(model, method, images, root, Path(tmp)) for method in METHODS}
            tpt = rows["tpt"]
            print(f"\n## {model} ({images} images of shapes_a)\n")
            print("| method | wall s / image | CPU s / image | TPT / method (wall) | peak memory MB |")
            print("|---|---|---|---|---|")
            for method, row in rows.items():
                print(
                    f"| {method} | {row['wall']:.4f} | {row['cpu']:.4f} | {tpt['wall'] / row['wall']:.1f}x | "
                    f"{row['peak_mb']:.0f} |"
                )


if __name__ == "__main__":
    main()
