"""Fault matrix for distillation: kill -9 at random steps and corrupt what is stored; never a wrong result.

Every cell of {dataset, folder, shards} x {0, 2 loader workers} x {1, 2 processes} x {no cache, cold cache, warm
cache} runs `promptkd distill` once uninterrupted, then again with the same command killed with SIGKILL at
``--kills`` random steps (each kill followed by the same command, which resumes); the final tensors must equal the
uninterrupted run's, bit for bit. Then stored files are damaged (a cache chunk, a shard member, the resume file,
the student checkpoint, the stored teacher features, a cache filled from other images) and each must end in a clear
message (exit 2, no traceback) or a recomputation that says so and gives the right result -- never a wrong result.

    python scripts/fault_matrix.py --out /tmp/faults            # the whole matrix (about 15 minutes on 2 cores)
    python scripts/fault_matrix.py --cells folder:2:1:cold --corruptions cache_chunk

Tiny random-weight CLIPs (pkd-tiny) and 32 generated images keep each run to a few seconds; each step sleeps
``--step-sleep`` seconds (an optimiser hook in the child process, no change to the code under test) so kills land
inside the run. The report (JSON + Markdown) says how many kill points were survived, how many corruptions were
detected, and how many runs ended wrong.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CLASSES = ["red circle", "green square", "blue triangle", "yellow cross"]
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40)]
IMAGES_PER_CLASS = 8
SOURCES = ("dataset", "folder", "shards")
WORKERS = (0, 2)
PROCESSES = (1, 2)
CACHES = ("none", "cold", "warm")
CORRUPTIONS = ("cache_chunk", "cache_other_images", "shard_member", "resume_file", "student_checkpoint", "features")


# ----------------------------------------------------------------------------------------------------------- data
def _image_bytes(label: int, index: int) -> bytes:
    """A small PNG whose content depends on class and index (so images with equal names can differ)."""
    from PIL import Image, ImageDraw

    rng = random.Random(label * 1000 + index)
    image = Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    x, y = rng.randrange(4, 16), rng.randrange(4, 16)
    draw.ellipse((x, y, x + 20, y + 20), fill=COLOURS[label])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_world(root: Path) -> dict[str, Path]:
    """Class folders (the labelled dataset, labels dropped), the same images flat, as two tar shards, and weights."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    members: list[tuple[str, bytes]] = []
    for label, name in enumerate(CLASSES):
        folder = root / "dataset" / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(IMAGES_PER_CLASS):
            data = _image_bytes(label, index)
            (folder / f"{index:03d}.png").write_bytes(data)
            flat = root / "folder" / f"{label}{index:03d}.png"
            flat.parent.mkdir(exist_ok=True)
            flat.write_bytes(data)
            members.append((f"{label}{index:03d}", data))
    (root / "shards").mkdir(exist_ok=True)
    for shard in range(4):
        with tarfile.open(root / "shards" / f"part-{shard}.tar", "w") as tar:
            for key, data in members[shard::4]:
                info = tarfile.TarInfo(f"{key}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    _write_weights(root / "tiny.safetensors")
    return {"root": root}


def _write_weights(path: Path) -> None:
    """pkd-tiny's seeded random weights in a file: teacher and student of every run start from the same bytes."""
    import torch
    from safetensors.torch import save_file

    from promptkd.backbones import load_backbone

    torch.manual_seed(0)
    model = load_backbone("pkd-tiny", "random").model
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


# ---------------------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    source: str
    workers: int
    processes: int
    cache: str

    @property
    def name(self) -> str:
        return f"{self.source}:{self.workers}:{self.processes}:{self.cache}"

    @classmethod
    def parse(cls, text: str) -> Cell:
        source, workers, processes, cache = text.split(":")
        return cls(source, int(workers), int(processes), cache)


def distill_args(world: Path, cell: Cell, out: Path, cache: Path | None) -> list[str]:
    """The `promptkd distill` arguments of a cell: the same global batch (8) on 1 or 2 processes."""
    source = {
        "dataset": ["--dataset", str(world / "dataset")],
        "folder": ["--unlabeled-folder", str(world / "folder"), "--classnames", str(world / "classnames.txt")],
        "shards": [
            "--unlabeled-shards",
            str(world / "shards" / "part-{0..3}.tar"),
            "--lanes",
            "4",
            "--classnames",
            str(world / "classnames.txt"),
        ],
    }[cell.source]
    weights = str(world / "tiny.safetensors")
    args = [
        "distill",
        *("--teacher-model", "pkd-tiny", "--teacher-pretrained", weights),
        *("--student-model", "pkd-tiny", "--student-pretrained", weights),
        *source,
        *("--out", str(out), "--no-eval", "--seed", "1", "--device", "cpu"),
    ]
    if cache is not None:
        args += ["--teacher-cache", str(cache), "--views", "3"]
    return [
        *args,
        "--set",
        "train.epochs=3",
        "train.batch_size=8",  # the global batch: 8 // processes images per process
        f"train.num_workers={cell.workers}",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "train.progress=false",
        "method.vision_depth=2",
    ]


def command(args: list[str], processes: int, step_sleep: float) -> list[str]:
    """This script as the child (it sleeps after every optimiser step, then runs promptkd), under torchrun if asked."""
    child = [str(Path(__file__).resolve()), "--child", str(step_sleep), "--", *args]
    if processes == 1:
        return [sys.executable, *child]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *child]


def run_child(step_sleep: float, argv: list[str]) -> int:
    """The child process: a per-step sleep (so a kill can land inside the run), then the promptkd command line."""
    if step_sleep > 0:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: time.sleep(step_sleep))
    from promptkd.cli.main import main

    return main(argv)


@dataclass
class Outcome:
    returncode: int
    output: str
    seconds: float
    killed_at: int | None = None


def _steps_done(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["global_step"] for line in lines if line.strip()), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def launch(cmd: list[str], out: Path, kill_at: int | None = None, jitter: float = 0.0, timeout: float = 300) -> Outcome:
    """Run ``cmd``; with ``kill_at``, SIGKILL its whole process group once step ``kill_at`` is logged (+ jitter)."""
    tic = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        killed = None
        while process.poll() is None:
            if time.perf_counter() - tic > timeout:
                os.killpg(process.pid, signal.SIGKILL)
                raise TimeoutError(f"{' '.join(cmd)} ran past {timeout} s")
            if kill_at is not None and killed is None and _steps_done(out) >= kill_at:
                time.sleep(jitter)
                killed = _steps_done(out)
                os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.01)
        process.wait()
    output = log.read_text(errors="replace")
    return Outcome(process.returncode, output, time.perf_counter() - tic, killed)


def final_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "prompts.safetensors"))


def compare(a: dict, b: dict) -> float | None:
    """Largest absolute difference between two tensor sets (None when their keys or shapes differ)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return None
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


@dataclass
class CellResult:
    cell: str
    kill_points: list[int] = field(default_factory=list)
    survived: int = 0
    not_killed: int = 0
    wrong: int = 0
    max_difference: float | None = 0.0
    seconds: float = 0.0
    error: str = ""


def run_cell(world: Path, work: Path, cell: Cell, kills: int, rng: random.Random, step_sleep: float) -> CellResult:
    """Uninterrupted reference, then the same command killed at ``kills`` random steps and resumed each time."""
    tic = time.perf_counter()
    result = CellResult(cell.name)
    folder = work / cell.name.replace(":", "-")
    shutil.rmtree(folder, ignore_errors=True)
    cache_ref = folder / "cache-ref" if cell.cache != "none" else None
    reference = launch(
        command(distill_args(world, cell, folder / "ref", cache_ref), cell.processes, 0.0), folder / "ref"
    )
    if reference.returncode != 0:
        result.error = "reference run failed: " + reference.output[-2000:]
        result.wrong = 1
        return result
    cache = None
    if cell.cache == "cold":
        cache = folder / "cache"
    elif cell.cache == "warm":
        cache = folder / "cache"
        shutil.copytree(cache_ref, cache)
    cmd = command(distill_args(world, cell, folder / "run", cache), cell.processes, step_sleep)
    total = _steps_done(folder / "ref")
    points = sorted(rng.sample(range(1, total), min(kills, total - 1)))
    for point in points:
        if _steps_done(folder / "run") >= point:
            continue
        outcome = launch(cmd, folder / "run", kill_at=point, jitter=rng.uniform(0, step_sleep))
        if outcome.killed_at is None:
            result.not_killed += 1
        else:
            result.kill_points.append(outcome.killed_at)
    finished = launch(cmd, folder / "run")
    if finished.returncode != 0:
        result.error = "resumed run failed: " + finished.output[-2000:]
        result.wrong = 1
    else:
        result.max_difference = compare(final_tensors(folder / "ref"), final_tensors(folder / "run"))
        if result.max_difference != 0.0:
            result.wrong = 1
        else:
            result.survived = len(result.kill_points)
    result.seconds = time.perf_counter() - tic
    return result


# ---------------------------------------------------------------------------------------------------- corruptions
@dataclass
class CorruptionResult:
    name: str
    verdict: str  # detected (exit 2, one message) | recomputed (said so, right result) | WRONG | CRASH
    detail: str = ""


def _one_message(outcome: Outcome) -> bool:
    return outcome.returncode == 2 and "Traceback" not in outcome.output


def _flip(path: Path, at: float = 0.5, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _verdict(outcome: Outcome, right: bool | None, said: tuple[str, ...]) -> tuple[str, str]:
    """detected / recomputed / WRONG / CRASH for a run that met a damaged file."""
    last = outcome.output.strip().splitlines()[-1:] or [""]
    if "Traceback" in outcome.output:
        return "CRASH", outcome.output[-1500:]
    if outcome.returncode == 2:
        return "detected", last[0]
    if outcome.returncode == 0 and right and any(word in outcome.output.lower() for word in said):
        return "recomputed", next(line for line in outcome.output.splitlines() if any(w in line.lower() for w in said))
    return "WRONG", f"exit {outcome.returncode}, result {'equal' if right else 'different'}: {outcome.output[-800:]}"


def corruption(world: Path, work: Path, name: str) -> CorruptionResult:
    """Damage one stored thing, run the command that reads it, and judge what it did."""
    folder = work / f"corrupt-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    cell = Cell("folder", 0, 1, "cold")
    shared = work / "corrupt-reference"  # one uninterrupted run (and its cache) serves every corruption
    if not (shared / "ref" / "prompts.safetensors").is_file():
        shutil.rmtree(shared, ignore_errors=True)
        ref = launch(command(distill_args(world, cell, shared / "ref", shared / "cache-ref"), 1, 0.0), shared / "ref")
        if ref.returncode != 0:
            return CorruptionResult(name, "CRASH", "reference failed: " + ref.output[-1500:])
    shutil.copytree(shared, folder)
    ref_cache = folder / "cache-ref"
    handler = {
        "cache_chunk": _corrupt_cache_chunk,
        "cache_other_images": _cache_other_images,
        "shard_member": _corrupt_shard_member,
        "resume_file": _corrupt_resume_file,
        "student_checkpoint": _corrupt_student_checkpoint,
        "features": _corrupt_features,
    }[name]
    verdict, detail = handler(world, folder, cell, ref_cache)
    return CorruptionResult(name, verdict, detail)


def _corrupt_cache_chunk(world: Path, folder: Path, cell: Cell, ref_cache: Path) -> tuple[str, str]:
    cache = folder / "cache"
    shutil.copytree(ref_cache, cache)
    chunks = sorted(cache.rglob("*.safetensors"))
    _flip(chunks[len(chunks) // 2])
    out = folder / "run"
    outcome = launch(command(distill_args(world, cell, out, cache), 1, 0.0), out)
    right = outcome.returncode == 0 and compare(final_tensors(folder / "ref"), final_tensors(out)) == 0.0
    return _verdict(outcome, right, ("damaged", "recomput", "corrupt"))


def _cache_other_images(world: Path, folder: Path, cell: Cell, ref_cache: Path) -> tuple[str, str]:
    """A cache filled on other images with the same file names: their rows must not be served."""
    other = folder / "other-world"
    shutil.copytree(world, other)
    for path in sorted((other / "folder").iterdir()):
        label, index = int(path.stem[0]), int(path.stem[1:])
        path.write_bytes(_image_bytes((label + 1) % len(CLASSES), index + 100))
    other_cache = folder / "cache-other"
    filled = launch(command(distill_args(other, cell, folder / "other", other_cache), 1, 0.0), folder / "other")
    if filled.returncode != 0:
        return "CRASH", "filling the other cache failed: " + filled.output[-1500:]
    out = folder / "run"
    outcome = launch(command(distill_args(world, cell, out, other_cache), 1, 0.0), out)
    right = outcome.returncode == 0 and compare(final_tensors(folder / "ref"), final_tensors(out)) == 0.0
    return _verdict(outcome, right, ("recomput", "content", "changed", "other images"))


def _corrupt_shard_member(world: Path, folder: Path, cell: Cell, ref_cache: Path) -> tuple[str, str]:
    broken = folder / "broken-world"
    shutil.copytree(world, broken)
    shard = broken / "shards" / "part-0.tar"
    with tarfile.open(shard) as tar:
        offset = next(m for m in tar.getmembers() if m.name.endswith(".png")).offset_data
    data = bytearray(shard.read_bytes())
    data[offset + 8 : offset + 40] = b"\0" * 32  # inside the first PNG's header chunk
    shard.write_bytes(bytes(data))
    out = folder / "run"
    outcome = launch(command(distill_args(broken, Cell("shards", 0, 1, "none"), out, None), 1, 0.0), out)
    return _verdict(outcome, False, ())


def _corrupt_resume_file(world: Path, folder: Path, cell: Cell, ref_cache: Path) -> tuple[str, str]:
    out = folder / "run"
    cmd = command(distill_args(world, cell, out, folder / "cache"), 1, 0.05)
    launch(cmd, out, kill_at=8)
    resume = out / "resume.pt"
    if not resume.is_file():
        return "WRONG", "no resume file after the kill"
    _flip(resume, at=0.6, count=64)
    outcome = launch(cmd, out)
    right = outcome.returncode == 0 and compare(final_tensors(folder / "ref"), final_tensors(out)) == 0.0
    return _verdict(outcome, right, ("damaged", "corrupt", "from the start", "restart"))


def _predict(world: Path, folder: Path) -> Outcome:
    """`promptkd predict` with the reference student on the folder's images."""
    student, out = str(folder / "ref" / "prompts"), str(folder / "predictions.csv")
    cmd = [sys.executable, "-m", "promptkd.cli.main", "predict", student, str(world / "folder"), "--out", out]
    return launch(cmd, folder / "predict")


def _corrupt_student_checkpoint(world: Path, folder: Path, cell: Cell, ref_cache: Path) -> tuple[str, str]:
    _flip(folder / "ref" / "prompts.safetensors", at=0.9)
    return _verdict(_predict(world, folder), False, ())


def _corrupt_features(world: Path, folder: Path, cell: Cell, ref_cache: Path) -> tuple[str, str]:
    features = sorted((folder / "ref").glob("teacher_features*.safetensors"))
    if not features:
        return "WRONG", "the run stored no teacher features"
    _flip(features[0], at=0.8)
    return _verdict(_predict(world, folder), False, ())


# ---------------------------------------------------------------------------------------------------------- report
def report(cells: list[CellResult], corruptions: list[CorruptionResult]) -> str:
    survived = sum(c.survived for c in cells)
    wrong = sum(c.wrong for c in cells) + sum(c.verdict in ("WRONG", "CRASH") for c in corruptions)
    detected = sum(c.verdict in ("detected", "recomputed") for c in corruptions)
    lines = [
        f"**{survived} kill points survived, {detected} of {len(corruptions)} corruptions detected, {wrong} wrong.**",
        "",
        "| cell (source:workers:processes:cache) | kill points (step) | final tensors | seconds |",
        "|---|---|---|---|",
    ]
    for c in cells:
        state = "equal" if not c.wrong else f"WRONG ({c.max_difference}) {c.error[:80]}"
        lines.append(f"| {c.cell} | {', '.join(map(str, c.kill_points)) or '-'} | {state} | {c.seconds:.0f} |")
    lines += ["", "| corruption | verdict | what the user saw |", "|---|---|---|"]
    for c in corruptions:
        detail = " ".join(c.detail.split())[:160].replace("|", "/")
        lines.append(f"| {c.name} | {c.verdict} | {detail} |")
    return "\n".join(lines)


def all_cells() -> list[Cell]:
    return [Cell(*combo) for combo in itertools.product(SOURCES, WORKERS, PROCESSES, CACHES)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return run_child(float(argv[1]), argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fault-matrix"))
    parser.add_argument("--cells", nargs="*", default=None, help="source:workers:processes:cache (default: all 36)")
    parser.add_argument("--corruptions", nargs="*", default=list(CORRUPTIONS), choices=CORRUPTIONS)
    parser.add_argument("--kills", type=int, default=2, help="kill points per cell")
    parser.add_argument("--step-sleep", type=float, default=0.08, help="seconds each step sleeps in the killed runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    world = args.out / "world"
    if not (world / "tiny.safetensors").is_file():
        make_world(world)
    cells = [Cell.parse(c) for c in args.cells] if args.cells is not None else all_cells()
    cell_results = []
    for cell in cells:
        cell_results.append(run_cell(world, args.out, cell, args.kills, rng, args.step_sleep))
        c = cell_results[-1]
        print(
            f"{c.cell}: kills at {c.kill_points}, {'equal' if not c.wrong else 'WRONG ' + c.error[-300:]}", flush=True
        )
    corruption_results = []
    for name in args.corruptions:
        corruption_results.append(corruption(world, args.out, name))
        print(f"{name}: {corruption_results[-1].verdict} {corruption_results[-1].detail[-200:]}", flush=True)
    text = report(cell_results, corruption_results)
    (args.out / "fault_matrix.md").write_text(text + "\n")
    payload = {"cells": [asdict(c) for c in cell_results], "corruptions": [asdict(c) for c in corruption_results]}
    (args.out / "fault_matrix.json").write_text(json.dumps(payload, indent=1))
    print(text)
    wrong = sum(c.wrong for c in cell_results) + sum(c.verdict in ("WRONG", "CRASH") for c in corruption_results)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
