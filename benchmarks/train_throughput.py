"""Training throughput per method: images/s of a full training step and peak memory, in one run.

Each method trains ``--steps`` steps on random images of the backbone's size in its own process (so peak RSS is
its own); the baseline is zero-shot CLIP's image-tower forward over the same batch, measured in the same run.
Text-heavy methods (CoCoOp: B x C text sequences per step) show their cost here.

    python benchmarks/train_throughput.py [--model pkd-world-student] [--classes 32] [--batch 32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time

import torch

METHODS = ("coop", "cocoop", "vpt", "ivlp", "maple", "promptsrc", "vp", "clip_adapter", "tip_adapter_f")


def _case(queue, method_name: str, model: str, classes: int, batch: int, steps: int, precision: str) -> None:
    from promptkd.backbones import autocast_for, load_backbone
    from promptkd.backbones.weights import shipped_weights
    from promptkd.config import load_preset
    from promptkd.methods import get_method
    from promptkd.methods.base import Batch, config_from

    torch.manual_seed(0)
    backbone = load_backbone(model, shipped_weights(model), precision=precision)
    names = [f"class {i}" for i in range(classes)]
    size = backbone.image_size
    images = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch) % classes
    if method_name == "baseline":

        def step():
            with torch.no_grad():
                backbone.model.encode_image(images)
    else:
        cls = get_method(method_name)
        preset = load_preset(cls.name, "world").get("method", {})
        method = cls(backbone, names, config_from(cls, preset))
        batches = [Batch(images, labels, torch.arange(batch))]
        method.prepare(lambda: iter(batches), lambda: iter(batches))
        params = method.trainable_parameters()
        optim = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        method.train()

        def step():
            loss = method.training_step(Batch(images, labels)).loss
            optim.zero_grad()
            loss.backward()
            optim.step()

    with autocast_for(precision, "cpu"):
        step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
    queue.put(
        {
            "method": method_name,
            "seconds_per_step": seconds,
            "images_per_second": batch / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkd-world-student")
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.model}, {args.classes} classes, batch {args.batch}, {args.precision}"
    )
    ctx = mp.get_context("spawn")
    rows = []
    for name in ["baseline", *args.methods]:
        queue = ctx.Queue()
        process = ctx.Process(
            target=_case, args=(queue, name, args.model, args.classes, args.batch, args.steps, args.precision)
        )
        process.start()
        rows.append(queue.get())
        process.join()
    base = rows[0]["images_per_second"]
    print("\n| method | s/step | images/s | vs image-tower forward | peak RSS (MB) |\n|---|---|---|---|---|")
    for r in rows:
        label = "image-tower forward (baseline)" if r["method"] == "baseline" else r["method"]
        print(
            f"| {label} | {r['seconds_per_step']:.3f} | {r['images_per_second']:.0f} | "
            f"{r['images_per_second'] / base:.2f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
