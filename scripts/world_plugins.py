"""The plug-ins the field stacks on PromptKD, on the embedded world: ATPrompt teachers and DPC, 3 seeds.

    python scripts/world_plugins.py --out runs/world_plugins [--dataset shapes] [--seeds 1 2 3]
        [--parts teachers students dpc] [--attributes background type]

- ``teachers``: CoOp, MaPLe and PromptSRC on the world teacher (``pkd-world-teacher``), each with and without the
  ATPrompt attributes (16 shots of the base classes, each method's ``world`` preset); the rows of the teachers.
- ``students``: a PromptKD student (``pkd-world-student``, ``world`` preset, transductive) distilled from each of
  those teachers (``promptkd protocol base2new --method promptkd --teacher FOLDER``).
- ``dpc``: the DPC stage (``dpc`` preset ``world``) over CoOp and PromptSRC on the student backbone and over the
  PromptKD students of the plain and the ATPrompt PromptSRC teachers (weights 0.2 / 0.0, the authors' choice for
  PromptKD); needs the ``students`` part first.
- ``weights``: DPC's inference weights re-applied to those DPC checkpoints (test split; an analysis, not a recipe).

Finished runs are reused on a re-run (the protocol runner skips them). The table (base / novel / HM / all classes,
mean ± std over seeds and the 95% interval of HM) is printed and written to ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from promptkd.backbones.weights import shipped_weights
from promptkd.data.world import ensure_world

TEACHER, STUDENT = "pkd-world-teacher", "pkd-world-student"
TEACHER_METHODS = ("coop", "maple", "promptsrc")


def _attribute_set(attributes: list[str]) -> str:
    return "method.attributes=[" + ", ".join(attributes) + "]"


def variants(attributes: list[str]) -> dict[str, list[str]]:
    """Row suffix -> method overrides: the plain prompt and the ATPrompt one."""
    return {"": [], "+atprompt": [_attribute_set(attributes)]}


def base2new(method: str, model: str, root: str, dataset: str, seeds: list[int], folder: Path, overrides: list[str]):
    """One base-to-novel protocol (finished seeds skipped) on a shipped world model; returns its seconds."""
    from promptkd.protocols import ProtocolSpec, run_protocol

    spec = ProtocolSpec(
        "base2new",
        method,
        "world",
        [dataset],
        seeds,
        str(folder),
        data_root=root,
        model=model,
        pretrained=shipped_weights(model),
        overrides=["train.progress=false", *overrides],
    )
    tic = time.perf_counter()
    run_protocol(spec)
    return time.perf_counter() - tic


def run_teachers(root: str, dataset: str, seeds: list[int], out: Path, attributes: list[str]) -> None:
    for method in TEACHER_METHODS:
        for suffix, overrides in variants(attributes).items():
            folder = out / "teachers" / f"{method}{suffix}"
            seconds = base2new(method, TEACHER, root, dataset, seeds, folder, overrides)
            print(f"teacher {method}{suffix}: {seconds:.0f} s", flush=True)


def teacher_folder(out: Path, dataset: str, seeds: list[int], name: str) -> Path:
    """The protocol's ``--teacher`` layout (``<folder>/<dataset>/seed_<s>/prompts.*``) over a teacher run's files."""
    folder = out / "teacher_links" / name
    for seed in seeds:
        run = out / "teachers" / name / "base2new" / dataset / name.split("+")[0] / f"seed_{seed}"
        target = folder / dataset / f"seed_{seed}"
        target.mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json"):
            link = target / f"prompts{suffix}"
            if not link.exists():
                os.symlink((run / f"prompts{suffix}").resolve(), link)
    return folder


def run_students(root: str, dataset: str, seeds: list[int], out: Path, attributes: list[str]) -> None:
    from promptkd.protocols import ProtocolSpec, run_protocol

    for method in TEACHER_METHODS:
        for suffix in variants(attributes):
            name = f"{method}{suffix}"
            spec = ProtocolSpec(
                "base2new",
                "promptkd",
                "world",
                [dataset],
                seeds,
                str(out / "students" / name),
                data_root=root,
                teacher=str(teacher_folder(out, dataset, seeds, name)),
                progress=False,
            )
            tic = time.perf_counter()
            run_protocol(spec)
            print(f"student from {name}: {time.perf_counter() - tic:.0f} s", flush=True)


def run_dpc(root: str, dataset: str, seeds: list[int], out: Path) -> None:
    """CoOp and PromptSRC (student backbone, 16 base shots) and the PromptKD students of the PromptSRC teachers,
    each then with the DPC stage over the same seed's tuned prompt (``method.base`` names it per seed)."""
    stages: list[tuple[str, str, list[str]]] = []
    for method in ("coop", "promptsrc"):
        base2new(method, STUDENT, root, dataset, seeds, out / "dpc" / method, [])
        stages.append((method, f"{out / 'dpc' / method}/base2new/{{dataset}}/{method}/seed_{{seed}}", []))
    for teacher in ("promptsrc", "promptsrc+atprompt"):
        base = f"{out / 'students' / teacher}/base2new/{{dataset}}/promptkd/seed_{{seed}}/student"
        stages.append((f"promptkd-{teacher}", base, ["method.weight_base=0.2", "method.weight_new=0.0"]))
    for name, base, weights in stages:
        folder = out / "dpc" / f"{name}+dpc"
        seconds = base2new("dpc", STUDENT, root, dataset, seeds, folder, [f"method.base={base}", *weights])
        print(f"dpc over {name}: {seconds:.0f} s", flush=True)


def test_sets(root: str, dataset: str, preprocess) -> dict[str, tuple[list[str], torch.Tensor, torch.Tensor]]:
    """The base, new and all-class test images of ``dataset`` held in memory, with their class lists and labels."""
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import ImageDataset
    from promptkd.data.sampling import subsample_classes
    from promptkd.data.transforms import build_transform

    splits = resolve_dataset(dataset, root)
    sets = {}
    for half in ("base", "new", "all"):
        part = subsample_classes(splits, half) if half != "all" else splits
        data = ImageDataset(part.test, build_transform(preprocess, train=False))
        pairs = [data[i] for i in range(len(data))]
        sets[half] = (part.classnames, torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))
    return sets


def weights_table(root: str, dataset: str, seeds: list[int], out: Path) -> str:
    """DPC's inference weights (ω_b / ω_n) re-applied to the trained DPC checkpoints: base, new and all-class
    accuracy, mean ± std over seeds. Scored on the test split: an analysis of the weights, not a way to pick them."""
    from promptkd.methods.dpc import DPC
    from promptkd.results import Stat

    grids = {"coop+dpc": [(0.5, 0.2), (0.5, 0.5), (0.2, 0.2)], "promptkd-promptsrc+dpc": [(0.2, 0.0), (0.2, 0.2)]}
    grids["promptkd-promptsrc+atprompt+dpc"] = grids["promptkd-promptsrc+dpc"]
    lines = ["| DPC over | ω_b / ω_n | base | new | HM | all classes |", "|---|---|---|---|---|---|"]
    for name, grid in grids.items():
        runs = [out / "dpc" / name / "base2new" / dataset / "dpc" / f"seed_{seed}" / "prompts" for seed in seeds]
        sets = test_sets(root, dataset, DPC.from_checkpoint(runs[0]).backbone.preprocess)
        for weights in grid:
            acc: dict[str, list[float]] = {}
            for run in runs:
                method = DPC.from_checkpoint(run, weight_base=weights[0], weight_new=weights[1])
                for half, (names, images, labels) in sets.items():
                    method.set_classnames(names)
                    with torch.no_grad():
                        hits = (method.logits(images).argmax(-1) == labels).float().mean()
                    acc.setdefault(half, []).append(100 * float(hits))
            hm = Stat.of([2 * b * n / (b + n) for b, n in zip(acc["base"], acc["new"])])
            cells = " | ".join(Stat.of(acc[h]).text(1) for h in ("base", "new"))
            lines.append(
                f"| {name} | {weights[0]} / {weights[1]} | {cells} | {hm.text(1)} | {Stat.of(acc['all']).text(1)} |"
            )
    return "\n".join(lines)


def table(out: Path) -> str:
    """Rows of every report.json under ``out``: base / novel / HM / all classes, mean ± std, HM's 95% interval."""
    from promptkd.results import Stat

    lines = [
        "| row | model | seeds | base | novel | HM (per-seed) | HM 95% interval | all classes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in sorted(out.rglob("report.json")):
        experiment = report.parent.parent.relative_to(out).as_posix()
        for row in json.loads(report.read_text(encoding="utf-8"))["rows"]:
            if row.get("base") is None or row["method"] == "zeroshot":
                continue
            if experiment.startswith("students/") and row["method"] != "promptkd":
                continue  # the teacher's own rows, already under teachers/
            base, novel = row["base"]["values"], row["novel"]["values"]
            hms = [2 * b * n / (b + n) for b, n in zip(base, novel)]
            hm = Stat.of(hms)
            lines.append(
                f"| {experiment} ({row['method']}) | {row['model'].split('/')[0]} | {len(hms)} | "
                f"{Stat.of(base).text(1)} | {Stat.of(novel).text(1)} | {hm.text(1)} | {hm.ci_text(1)} | "
                f"{Stat.of(row['metrics']['acc1']['values']).text(1)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/world_plugins")
    parser.add_argument("--world-root", default=None)
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--parts", nargs="+", default=["teachers", "students", "dpc", "weights"])
    parser.add_argument(
        "--attributes", nargs="+", default=["background", "type"], help="ATPrompt words (attribute-search's choice)"
    )
    args = parser.parse_args()
    root = str(ensure_world(args.world_root))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "teachers" in args.parts:
        run_teachers(root, args.dataset, args.seeds, out, args.attributes)
    if "students" in args.parts:
        run_students(root, args.dataset, args.seeds, out, args.attributes)
    if "dpc" in args.parts:
        run_dpc(root, args.dataset, args.seeds, out)
    text = table(out)
    if "weights" in args.parts:
        text += "\n\n" + weights_table(root, args.dataset, args.seeds, out)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
