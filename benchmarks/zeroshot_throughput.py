"""Zero-shot evaluation throughput (images/s), with the data pipeline measured apart from the model.

Three timings per model, in one run: the loader alone (decode + eval transform, no model), the image tower alone
(pre-loaded tensors), and the end-to-end zero-shot evaluation (`evaluate_zeroshot`). If end-to-end is much slower
than the model alone, the loader is the bottleneck. Ratios are against the model-alone figure of the same run.

    python benchmarks/zeroshot_throughput.py [--world-root DIR] [--vit-b16] [--device cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def loader_alone(items, preprocess, batch_size: int, workers: int) -> float:
    from promptkd.data.items import ImageDataset
    from promptkd.data.transforms import build_transform

    dataset = ImageDataset(items, build_transform(preprocess, train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    n = sum(images.shape[0] for images, _ in loader)
    return _rate(n, time.perf_counter() - start)


@torch.no_grad()
def model_alone(backbone, n_images: int, batch_size: int) -> float:
    size = backbone.image_size
    images = torch.randn(batch_size, 3, size, size, device=backbone.device)
    with backbone.autocast():
        backbone.model.encode_image(images)  # warm-up
        start = time.perf_counter()
        done = 0
        while done < n_images:
            backbone.model.encode_image(images)
            done += batch_size
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return _rate(done, time.perf_counter() - start)


def end_to_end(backbone, split, batch_size: int, workers: int) -> float:
    from promptkd.evaluation.zeroshot import evaluate_zeroshot

    start = time.perf_counter()
    result = evaluate_zeroshot(
        backbone,
        split.test,
        split.classnames,
        [split.template],
        batch_size=batch_size,
        num_workers=workers,
        progress=False,
    )
    return _rate(result.num_samples, time.perf_counter() - start)


def main() -> None:
    from promptkd.backbones import load_backbone
    from promptkd.backbones.weights import shipped_weights
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.world import build_world, default_world_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-root", default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--vit-b16", action="store_true", help="also time a random-weight ViT-B/16 at 224 px")
    args = parser.parse_args()
    root = args.world_root or str(default_world_root())
    build_world(root)
    split = resolve_dataset("shapes", root)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}, precision {args.precision}"
    )
    print(f"dataset: world 'shapes' test split, {len(split.test)} images of 32 px\n")
    rows = []
    models = ["pkd-world-student", "pkd-world-teacher"] + (["ViT-B-16"] if args.vit_b16 else [])
    for name in models:
        backbone = load_backbone(name, shipped_weights(name), device=args.device, precision=args.precision).freeze()
        batch = args.batch_size if backbone.image_size <= 64 else 32
        n_model = 4096 if backbone.image_size <= 64 else 128
        model = model_alone(backbone, n_model, batch)
        if backbone.image_size <= 64:
            loader = loader_alone(split.test, backbone.preprocess, batch, args.workers)
            total = end_to_end(backbone, split, batch, args.workers)
        else:
            loader = total = float("nan")
        rows.append((name, loader, model, total))
    header = "| model | loader alone (img/s) | image tower alone (img/s) | end-to-end zero-shot (img/s) "
    print(header + "| end-to-end / tower |")
    print("|---|---|---|---|---|")
    for name, loader, model, total in rows:
        print(f"| {name} | {loader:,.0f} | {model:,.0f} | {total:,.0f} | {total / model:.2f} |")


if __name__ == "__main__":
    main()
