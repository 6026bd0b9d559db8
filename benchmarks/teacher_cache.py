"""Distillation at scale: the teacher's cached soft labels (FKD) and streamed shards, against the live teacher.

In one run on one machine (each measurement in its own process, one at a time):

1. **Per-epoch time** of PromptKD distillation through the engine (`run_distillation`), world pair (`shapes`,
   2,560 unlabelled images, batch 32) and ViT-B/16 student + ViT-L/14 teacher (random weights, 224 px, 32 images,
   batch 4): the live teacher (no cache), a cold cache (the teacher runs and its logits are stored), a warm cache
   (no teacher forward), and the floor: the same loop with the teacher's logits replaced by a constant (data +
   student forward and backward alone). Target: warm <= 1.10 x floor, i.e. >= 2.5x faster than live per epoch.
2. **A 3-seed x 3-lr sweep** end to end (world pair, `shapes`, evaluation included), without and with the cache.
3. **Cache size per million views**: full logits (fp32, fp16) and FKD's top-k, measured on the files written.
4. **Top-k vs full**: the student trained from a top-5 cache against the one trained from full logits.
5. **Streaming throughput**: the `shapes` train images packed into 8 tar shards and streamed (decode + train
   transform) against the in-memory-index reader on the same files.

    python benchmarks/teacher_cache.py [--epochs 4] [--parts epoch sweep size topk stream] [--pairs world vit]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import torch

WORLD_TEACHER = "pkd-world-teacher"
WORLD_STUDENT = "pkd-world-student"


def _teacher_checkpoint(folder: Path) -> str:
    """A PromptSRC teacher on the shipped world teacher, prompts trained for one epoch on 16 shots (quick)."""
    from promptkd.data.world import ensure_world
    from promptkd.engine.run import resolve_run_config, run_training

    path = folder / "teacher" / "prompts.safetensors"
    if not path.is_file():
        config = resolve_run_config(
            "promptsrc",
            "world",
            ["train.epochs=1", "train.progress=false"],
            {
                "dataset": "shapes",
                "data_root": str(ensure_world()),
                "model": WORLD_TEACHER,
                "pretrained": "shipped",
                "out": str(folder / "teacher"),
                "evaluate": False,
            },
        )
        run_training(config)
    return str(path)


def _distill(queue, config: dict, overrides: list[str], floor: bool) -> None:
    """One distillation run in its own process; reports training seconds per epoch and the results."""
    torch.set_num_threads(torch.get_num_threads())
    from promptkd.distill.run import resolve_distill_config, run_distillation

    if floor:  # the teacher's logits replaced by a constant: data + student forward/backward alone
        from promptkd.methods.promptkd import PromptKD

        def constant(self, images, keys=None):
            return torch.zeros(images.shape[0], self.text_features.shape[0], device=images.device)

        PromptKD.teacher_logits = constant
    cfg = resolve_distill_config("world", ["train.progress=false", *overrides], config)
    start, cpu_start = time.perf_counter(), time.process_time()
    outcome = run_distillation(cfg)
    cpu_seconds = time.process_time() - cpu_start
    result = next(r for r in outcome.results) if outcome.results else {}
    queue.put(
        {
            "train_seconds": outcome.train_seconds,
            "epochs": cfg.train.epochs,
            "wall_seconds": time.perf_counter() - start,
            "cpu_seconds": cpu_seconds,  # this process's CPU time: steadier than wall time on a busy machine
            "hm": result.get("hm"),
            "acc": {r["subsample"]: r["metrics"]["acc1"] for r in outcome.results},
            "cache": result.get("teacher_cache"),
            "checkpoint": str(outcome.checkpoint),
        }
    )


def run(config: dict, overrides: list[str], floor: bool = False) -> dict:
    """One distillation in a fresh process, in an empty run folder (a folder a reused --work left behind would be
    resumed, finished, and time nothing)."""
    shutil.rmtree(config["out"], ignore_errors=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_distill, args=(queue, config, overrides, floor))
    process.start()
    result = queue.get()
    process.join()
    return result


def epoch_part(pair: str, work: Path, epochs: int) -> list[str]:
    from promptkd.data.world import ensure_world

    root = str(ensure_world())
    if pair == "world":
        base = {
            "teacher": _teacher_checkpoint(work),
            "student_model": WORLD_STUDENT,
            "dataset": "shapes",
            "data_root": root,
        }
        sets = [f"train.epochs={epochs}"]
    else:
        base = {
            "teacher_model": "ViT-L-14",
            "student_model": "ViT-B-16",
            "student_pretrained": "random",
            "teacher_pretrained": "random",
            "dataset": "shapes",
            "data_root": root,
            "max_images": 32,
            "evaluate": False,  # scoring a random ViT-L/14 on every test image at 224 px takes far longer than training
        }
        sets = ["train.epochs=1", "train.batch_size=4", "method.vision_depth=9", "train.crop_scale=[0.5,1.0]"]
        epochs = 1
    cache = work / f"cache-{pair}"
    shutil.rmtree(cache, ignore_errors=True)
    cases_floor = "floor: data + student fwd/bwd alone"
    cases = {
        "live teacher (no cache)": run({**base, "out": str(work / f"{pair}-live")}, sets),
        "cold cache (teacher runs, logits stored)": run(
            {**base, "out": str(work / f"{pair}-cold"), "teacher_cache": str(cache), "views": epochs}, sets
        ),
        "warm cache (no teacher forward)": run(
            {**base, "out": str(work / f"{pair}-warm"), "teacher_cache": str(cache), "views": epochs}, sets
        ),
        cases_floor: run({**base, "out": str(work / f"{pair}-floor")}, sets, floor=True),
    }
    lines = ["| case | s/epoch | vs live |", "|---|---|---|"]
    live = cases["live teacher (no cache)"]["train_seconds"] / epochs
    for name, r in cases.items():
        per = r["train_seconds"] / r["epochs"]
        lines.append(f"| {name} | {per:.1f} | {live / per:.2f}x |")
    warm = cases["warm cache (no teacher forward)"]["train_seconds"]
    floor = cases[cases_floor]["train_seconds"]
    lines.append(f"\nwarm / floor = {warm / floor:.3f} (target <= 1.10); live / warm = {live * epochs / warm:.2f}x")
    cpu_warm, cpu_floor = (cases[k]["cpu_seconds"] for k in ("warm cache (no teacher forward)", cases_floor))
    lines.append(f"CPU time (whole run, evaluation included): warm / floor = {cpu_warm / cpu_floor:.3f}")
    return lines


def sweep_part(work: Path, epochs: int) -> list[str]:
    from promptkd.data.world import ensure_world

    base = {
        "teacher": _teacher_checkpoint(work),
        "student_model": WORLD_STUDENT,
        "dataset": "shapes",
        "data_root": str(ensure_world()),
    }
    cache = work / "cache-sweep"
    shutil.rmtree(cache, ignore_errors=True)
    totals, hms = {}, {}
    for mode in ("live", "cached"):
        start = time.perf_counter()
        for seed in (1, 2, 3):
            for lr in (0.001, 0.002, 0.004):
                extra = {"teacher_cache": str(cache), "views": epochs} if mode == "cached" else {}
                r = run(
                    {**base, **extra, "seed": seed, "out": str(work / f"sweep-{mode}-{seed}-{lr}")},
                    [f"train.epochs={epochs}", f"train.lr={lr}"],
                )
                hms.setdefault(mode, []).append(100 * r["hm"])
        totals[mode] = time.perf_counter() - start
    return [
        "| sweep (3 seeds x 3 lr, end to end) | minutes | mean HM |",
        "|---|---|---|",
        *(f"| {m} | {totals[m] / 60:.1f} | {sum(hms[m]) / len(hms[m]):.1f} |" for m in totals),
        f"\ncached / live = {totals['cached'] / totals['live']:.2f} (the first cached run fills the cache)",
    ]


def size_part(work: Path) -> list[str]:
    """Bytes per view of the cache files written by the other parts, scaled to a million views."""
    from promptkd.distill.cache import TeacherCache

    lines = ["| storage | classes | bytes per view | GB per million views |", "|---|---|---|---|"]
    for folder in sorted(work.glob("cache-*")):
        record = json.loads((folder / "cache.json").read_text())
        files = list(folder.glob("chunk-*.safetensors"))
        entries = len(
            TeacherCache(
                folder,
                {
                    k: record[k]
                    for k in ("teacher", "features_sha256", "classnames_sha256", "num_classes", "logit_scale", "recipe")
                },
                storage=record["storage"]["form"],
                topk=record["storage"]["topk"] or 10,
                dtype=record["storage"]["dtype"],
            )._index
        )
        size = sum(f.stat().st_size for f in files)
        form = record["storage"]
        label = f"{form['form']} {form['dtype']}" + (f" k={form['topk']}" if form["topk"] else "")
        per = size / max(1, entries)
        lines.append(f"| {label} ({folder.name}) | {record['num_classes']} | {per:.0f} | {per * 1e6 / 1e9:.2f} |")
    lines.append(
        "\n1,000 classes (ImageNet): full fp32 = 4,000 B + key per view (4 GB per million views), fp16 2 GB; "
        "top-10 = 10 x (2 + 4) + 4 = 64 B + key (under 0.2 GB)."
    )
    return lines


def topk_part(work: Path, epochs: int) -> list[str]:
    from promptkd.data.world import ensure_world

    base = {
        "teacher": _teacher_checkpoint(work),
        "student_model": WORLD_STUDENT,
        "dataset": "shapes",
        "data_root": str(ensure_world()),
        "views": epochs,
    }
    sets = [f"train.epochs={epochs}"]
    out = {}
    for name, extra in (
        ("full fp32", {}),
        ("full fp16", {"teacher_cache_dtype": "fp16"}),
        ("top-5 fp16", {"teacher_cache_topk": 5, "teacher_cache_dtype": "fp16"}),
    ):
        cache = work / f"cache-{name.replace(' ', '-')}"
        shutil.rmtree(cache, ignore_errors=True)
        out[name] = run({**base, **extra, "teacher_cache": str(cache), "out": str(work / f"topk-{name}")}, sets)
    from promptkd.checkpoints import load_checkpoint

    reference = load_checkpoint(out["full fp32"]["checkpoint"])[0]
    lines = ["| soft labels | base | novel | HM | max abs prompt difference vs full fp32 |", "|---|---|---|---|---|"]
    for name, r in out.items():
        tensors = load_checkpoint(r["checkpoint"])[0]
        diff = max(float((tensors[k] - reference[k]).abs().max()) for k in reference)
        a = r["acc"]
        lines.append(f"| {name} | {100 * a['base']:.1f} | {100 * a['new']:.1f} | {100 * r['hm']:.1f} | {diff:.2e} |")
    return lines


def stream_part(work: Path) -> list[str]:
    """Images/s of streamed shards vs the in-memory-index reader, same files, same transform, batch 32."""
    from promptkd.backbones import load_backbone
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import ImageDataset
    from promptkd.data.shards import ShardLanes
    from promptkd.data.transforms import train_transform
    from promptkd.data.world import ensure_world
    from promptkd.engine.data import make_loader
    from promptkd.engine.stream import StreamSource, stream_batches

    splits = resolve_dataset("shapes", ensure_world())
    paths = [d.path for d in splits.train]
    shards = work / "shards"
    shards.mkdir(exist_ok=True)
    for s in range(8):
        with tarfile.open(shards / f"shapes-{s:02d}.tar", "w") as tar:
            for path in paths[s::8]:
                data = Path(path).read_bytes()
                info = tarfile.TarInfo(f"{Path(path).parent.name}_{Path(path).name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    transform = train_transform(load_backbone(WORLD_STUDENT, "shipped").preprocess, scale=(0.5, 1.0))
    n = len(paths) // 32
    loader, _, _ = make_loader(ImageDataset(paths, transform), batch_size=32, seed=1, shuffle=True)
    start = time.perf_counter()
    for _ in loader:
        pass
    memory = n * 32 / (time.perf_counter() - start)
    source = StreamSource(ShardLanes(str(shards / "shapes-*.tar"), lanes=8, seed=1), transform, seed=1)
    start = time.perf_counter()
    for _, _ in zip(stream_batches(source, batch_size=32), range(n)):
        pass
    streamed = n * 32 / (time.perf_counter() - start)
    return [
        "| reader | images/s (decode + train transform, batch 32, 1 process) |",
        "|---|---|",
        f"| in-memory index (ImageDataset, PNG files) | {memory:.0f} |",
        f"| streamed tar shards (8 shards, 8 lanes) | {streamed:.0f} |",
        f"\nstreamed / in-memory = {streamed / memory:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per world run (and views per image)")
    parser.add_argument("--parts", nargs="+", default=["epoch", "sweep", "topk", "size", "stream"])
    parser.add_argument("--pairs", nargs="+", default=["world", "vit"])
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="pkd-cache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; work folder {work}"
    )
    if "epoch" in args.parts:
        for pair in args.pairs:
            print(f"\n## per-epoch time, {pair} pair\n" + "\n".join(epoch_part(pair, work, args.epochs)), flush=True)
    if "sweep" in args.parts:
        print("\n## sweep\n" + "\n".join(sweep_part(work, args.epochs)), flush=True)
    if "topk" in args.parts:
        print("\n## top-k vs full\n" + "\n".join(topk_part(work, args.epochs)), flush=True)
    if "size" in args.parts:
        print("\n## cache size\n" + "\n".join(size_part(work)), flush=True)
    if "stream" in args.parts:
        print("\n## streaming\n" + "\n".join(stream_part(work)), flush=True)


if __name__ == "__main__":
    main()
