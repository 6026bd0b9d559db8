"""A run in the Hugging Face Hub's model-repo layout: ``promptkd export CKPT --format hub --out DIR``.

The folder holds the run's promptkd files byte for byte (so their own hashes still bind them: ``tensors_sha256``,
``features_sha256``, the teacher's ``checkpoint_sha256``), a ``config.json`` that says which file plays which part
(read by :func:`promptkd.hub.resolve_file`), and a model card ``README.md`` (YAML front matter for the Hub; what the
model was trained on and its per-seed results, read from the run's ``runs.jsonl``). Nothing else is written, so the
folder is exactly what ``huggingface_hub.upload_folder`` pushes, and it loads back as it is: as a local folder, or
as ``hf-hub:ORG/NAME`` once pushed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from promptkd._version import __version__
from promptkd.checkpoints import atomic_path, atomic_write_text, checkpoint_paths, file_sha256, load_checkpoint
from promptkd.hub import HUB_CONFIG, HUB_FORMAT, HUB_VERSION, HubError, hub_folder_config
from promptkd.hub import ROLES as ROLE_WORDS

__all__ = ["CARD", "export_hub", "model_card", "per_seed_results"]

CARD = "README.md"
#: the names the parts get in the folder (the student's features keep the name its loader looks for beside it)
NAMES = {"checkpoint": "prompts", "features": "teacher_features", "teacher": "teacher"}
#: method settings that hold paths of the machine that trained the run (not part of its recipe)
_PATH_KEYS = ("teacher_checkpoint", "teacher_features")


def _check_out(out: Path) -> None:
    """A Hub folder is pushed whole: refuse one holding files that are not a previous export's."""
    if not out.is_dir():
        return
    previous = hub_folder_config(out) or {}
    own = {CARD, HUB_CONFIG, *(previous.get("sha256") or {})}
    other = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name not in own)
    if other:
        raise HubError(
            f"--out {out} holds other files ({', '.join(other[:5])}); a Hub folder is uploaded whole, so give a new "
            "or empty folder (or one a previous `promptkd export --format hub` wrote)."
        )


def _copy_pair(source: Path, out: Path, stem: str) -> dict[str, str]:
    """Copy a .safetensors file and its .json record as they are; their SHA-256 by file name."""
    digests = {}
    for src in (source, source.with_suffix(".json")):
        target = out / (stem + src.suffix)
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        digests[target.name] = file_sha256(target)
        if digests[target.name] != file_sha256(src):
            raise HubError(f"{src} changed while it was copied to {target}; export again.")
    return digests


def _teacher_file(meta: dict[str, Any]) -> tuple[Path | None, str]:
    """The student's teacher checkpoint when it is here and is the one it was distilled from (by content)."""
    recorded = str((meta.get("method_config") or {}).get("teacher_checkpoint") or "")
    if not recorded:
        return None, "the student records no teacher checkpoint (a zero-shot teacher)"
    path = checkpoint_paths(recorded)[0]
    if not path.is_file():
        return None, f"its teacher checkpoint {path} is not on this machine"
    if file_sha256(path) != (meta.get("teacher") or {}).get("checkpoint_sha256"):
        return None, f"{path} is no longer the teacher the student was distilled from (its SHA-256 differs)"
    return path, ""


def _recipe(meta: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same recipe (other seeds of one protocol run): method, its settings, the data."""
    settings = {k: v for k, v in (meta.get("method_config") or {}).items() if k not in _PATH_KEYS}
    train = {k: v for k, v in (meta.get("train") or {}).items() if k != "seed"}
    return {"method": meta.get("method"), "settings": settings, "train": train, "data": _data(meta)}


def _data(meta: dict[str, Any]) -> dict[str, Any]:
    run = meta.get("run") or {}
    keys = ("dataset", "protocol", "subsample", "shots", "mode", "unlabeled_split", "max_images", "max_per_class")
    return {k: run[k] for k in keys if run.get(k) not in (None, "")}


def _run_folders(folder: Path, meta: dict[str, Any]) -> list[Path]:
    """The run's folder, plus the same recipe's other seeds when it is one seed of a protocol run (seed_N/...)."""
    folders = [folder]
    for level in (folder, folder.parent):
        if re.fullmatch(r"seed_\d+", level.name):
            inner = folder.relative_to(level)
            for sibling in sorted(level.parent.glob("seed_*")):
                record = sibling / inner / "prompts.json"
                if sibling == level or not record.is_file():
                    continue
                try:
                    other = json.loads(record.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if _recipe(other) == _recipe(meta):
                    folders.append(sibling / inner)
            break
    return folders


def _seed_rows(folder: Path) -> dict[tuple[Any, Any], dict[str, Any]]:
    """The latest test result per (dataset, seed) of a run folder's runs.jsonl, by subsample (all/base/new)."""
    table = folder / "runs.jsonl"
    rows: dict[tuple[Any, Any], dict[str, Any]] = {}
    if not table.is_file():
        return rows
    for line in table.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        acc = (row.get("metrics") or {}).get("acc1") if isinstance(row, dict) else None
        if acc is None or row.get("split", "test") != "test":
            continue
        entry = rows.setdefault((row.get("dataset"), row.get("seed")), {"protocol": row.get("protocol")})
        entry[str(row.get("subsample") or "all")] = 100.0 * float(acc)
    return rows


def per_seed_results(checkpoint: str | Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (dataset, seed) of the run and its sibling seeds: top-1 % on all/base/new classes and the HM."""
    from promptkd.evaluation.metrics import harmonic_mean

    folder = checkpoint_paths(checkpoint)[0].parent
    exported = (meta.get("train") or {}).get("seed", (meta.get("run") or {}).get("seed"))
    results = []
    for run_folder in _run_folders(folder, meta):
        for (dataset, seed), entry in sorted(_seed_rows(run_folder).items(), key=lambda item: str(item[0])):
            if "base" in entry and "new" in entry:
                entry["hm"] = harmonic_mean(entry["base"], entry["new"])
            results.append({"dataset": dataset, "seed": seed, "these_weights": run_folder == folder, **entry})
    results.sort(key=lambda r: (str(r["dataset"]), str(r["seed"])))
    if results and not any(r["these_weights"] for r in results) and exported is not None:
        raise HubError(f"{folder}: its runs.jsonl holds no result of seed {exported}; evaluate the run first.")
    return results


def _hub_repo(spec: dict[str, Any]) -> str | None:
    """The Hub repo a backbone's weights come from (the card's base_model), when they come from the Hub."""
    name, weights = str(spec.get("model_name") or ""), str(spec.get("pretrained") or "")
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:") :].split("@")[0].strip("/") or None
    if spec.get("source") != "tag" or not weights:
        return None
    import open_clip

    hub = str((open_clip.get_pretrained_cfg(name, weights) or {}).get("hf_hub") or "").strip("/")
    return "/".join(hub.split("/")[:2]) or None


def _backbone_text(spec: dict[str, Any]) -> str:
    weights = spec.get("pretrained") or "random weights"
    if spec.get("source") == "file" and weights != "shipped":
        weights = f"weight file {Path(str(weights)).name}"
    return f"{spec.get('model_name')} ({weights})"


def export_hub(checkpoint: str | Path, out: str | Path, features: str | Path | None = None) -> dict[str, Any]:
    """Write the run of ``checkpoint`` to ``out`` in the Hub's layout (see the module docstring); returns the
    config written. The checkpoint (a student: with its stored features) is loaded first, as predict would."""
    from promptkd.deploy import STUDENT_METHODS, load_for_inference
    from promptkd.distill.teacher import TEACHER_METHODS
    from promptkd.paths import writable_folder

    out = Path(out).expanduser()
    _check_out(out)
    _, meta = load_checkpoint(checkpoint)
    student = meta.get("method") in STUDENT_METHODS
    method = load_for_inference(checkpoint, features) if student else None
    results = per_seed_results(checkpoint, meta)
    writable_folder(out)
    digests = _copy_pair(checkpoint_paths(checkpoint)[0], out, NAMES["checkpoint"])
    files, left_out = {"checkpoint": NAMES["checkpoint"] + ".safetensors"}, []
    if student:
        digests |= _copy_pair(Path(method.stored.source), out, NAMES["features"])
        files["features"] = NAMES["features"] + ".safetensors"
        teacher, why = _teacher_file(meta)
        if teacher is not None:
            digests |= _copy_pair(teacher, out, NAMES["teacher"])
            files["teacher"] = NAMES["teacher"] + ".safetensors"
        else:
            left_out.append(f"the teacher's checkpoint: {why}")
    elif meta.get("method") in TEACHER_METHODS:
        files["teacher"] = files["checkpoint"]
    config = _config(meta, files, digests, results, left_out)
    previous = set((hub_folder_config(out) or {}).get("sha256") or {})
    for stale in previous - set(digests):
        (out / stale).unlink(missing_ok=True)
    atomic_write_text(out / HUB_CONFIG, json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(out / CARD, model_card(config))
    return config


def _config(
    meta: dict[str, Any], files: dict[str, str], digests: dict[str, str], results: list, left_out: list[str]
) -> dict[str, Any]:
    teacher = meta.get("teacher") or {}
    backbones = [meta.get("backbone") or {}]
    if teacher.get("backbone"):
        about = teacher.get("about") or {}
        backbones.append(
            {**teacher["backbone"], "pretrained": about.get("weights"), "source": about.get("weights_source")}
        )
    return {
        "format": HUB_FORMAT,
        "format_version": HUB_VERSION,
        "library_name": "promptkd",
        "library_version": __version__,
        "method": meta.get("method"),
        "files": files,
        "sha256": digests,
        "backbone": meta.get("backbone"),
        "teacher": {k: v for k, v in teacher.items() if k != "about"} or None,
        "base_models": sorted({repo for spec in backbones if (repo := _hub_repo(spec))}),
        "classnames": list(meta.get("classnames") or []),
        "training": {"data": _data(meta), "method_config": _recipe(meta)["settings"], "train": meta.get("train")},
        "source": (meta.get("run") or {}).get("unlabeled") or None,
        "results": results,
        "not_included": left_out,
    }


def _pct(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else "–"


def _results_table(results: list[dict[str, Any]]) -> list[str]:
    """Per-seed rows (base / new / HM / all classes, the columns the run has) and their mean over seeds."""
    from promptkd.evaluation.metrics import harmonic_mean

    if not results:
        return ["No evaluation was recorded for this run (its runs.jsonl holds no test result)."]
    columns = [c for c in ("base", "new", "hm", "all") if any(c in r for r in results)]
    names = {"base": "base", "new": "new", "hm": "HM", "all": "all classes"}
    lines = ["| dataset | seed | " + " | ".join(names[c] for c in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for r in results:
        seed = f"{r['seed']} (these weights)" if r["these_weights"] else str(r["seed"])
        lines.append(f"| {r['dataset']} | {seed} | " + " | ".join(_pct(r.get(c)) for c in columns) + " |")
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset]
        if len(rows) > 1:
            means = {c: [r[c] for r in rows if c in r] for c in columns}
            mean = {c: sum(m) / len(m) for c, m in means.items() if m and len(m) == len(rows)}
            if "base" in mean and "new" in mean:  # HM of the seed-averaged accuracies, as the report computes it
                mean["hm"] = harmonic_mean(mean["base"], mean["new"])
            cells = [_pct(mean.get(c)) for c in columns]
            lines.append(f"| {dataset} | mean of {len(rows)} | " + " | ".join(cells) + " |")
    return lines


def _front_matter(config: dict[str, Any]) -> list[str]:
    data = (config.get("training") or {}).get("data") or {}
    tags = ["promptkd", "clip", "prompt-learning", str(config.get("method"))]
    if config.get("files", {}).get("features"):
        tags.append("knowledge-distillation")
    tags += [str(data["dataset"])] if data.get("dataset") else []
    lines = ["---", "library_name: promptkd", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {json.dumps(tag)}" for tag in dict.fromkeys(tags)]
    if config.get("base_models"):
        lines += ["base_model:", *(f"- {repo}" for repo in config["base_models"])]
    return [*lines, "---", ""]


def model_card(config: dict[str, Any]) -> str:
    """The README.md of a Hub folder: front matter the Hub reads, then what was trained, how, and its results."""
    student = bool(config["files"].get("features"))
    teacher = config.get("teacher") or {}
    training = config.get("training") or {}
    data, train = training.get("data") or {}, training.get("train") or {}
    backbone = _backbone_text(config.get("backbone") or {})
    title = f"{config['method']} on {data.get('dataset', 'your data')}: {backbone}"
    lines = [*_front_matter(config), f"# {title}", ""]
    if student:
        tb = teacher.get("backbone") or {}
        lines.append(
            f"A PromptKD student: prompts and a projector on the image tower of {backbone}, distilled from a "
            f"{teacher.get('method')} teacher on {tb.get('model_name')} without labels. It predicts with its image "
            f"tower and the teacher's stored text features of its {len(config['classnames'])} classes only."
        )
    else:
        lines.append(f"Learnt prompts ({config['method']}) for {backbone}, {len(config['classnames'])} classes.")
    source = config.get("source") or {}
    recipe = ", ".join(
        f"{k} {train[k]}" for k in ("epochs", "batch_size", "optimizer", "lr", "scheduler") if k in train
    )
    lines += ["", "## Training", ""]
    lines += [f"- data: {', '.join(f'{k} {v}' for k, v in data.items() if v) or 'not recorded'}"]
    lines += [f"- images: {source['source']}"] if source.get("source") else []
    lines += [f"- recipe: {recipe}, seed {train.get('seed')}"] if recipe else []
    settings = training.get("method_config") or {}
    lines += [
        f"- {config['method']} settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()) if v != "")
    ]
    if teacher:
        lines += [f"- teacher: {teacher.get('method')}, checkpoint SHA-256 {teacher.get('checkpoint_sha256')}"]
    lines += ["", "## Results (top-1 %, test split, per seed)", "", *_results_table(config.get("results") or [])]
    lines += [
        "",
        "## Use",
        "",
        "With promptkd installed, this repo's name (ORG/NAME) goes wherever a checkpoint does:",
        "",
    ]
    lines += ["```bash", "promptkd predict hf-hub:ORG/NAME images/ --out predictions.csv", "```", "", "Files:", ""]
    roles: dict[str, list[str]] = {}
    for role, name in sorted(config["files"].items()):
        roles.setdefault(name, []).append(ROLE_WORDS[role])
    for name, words in roles.items():
        lines.append(f"- `{name}` (+ `.json`): the {' and '.join(words)}, SHA-256 {config['sha256'][name]}")
    lines += [f"- not included: {why}" for why in config.get("not_included") or []]
    return "\n".join(lines) + "\n"
