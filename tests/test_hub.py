"""Models by name: `promptkd export --format hub` writes a Hub model repo that loads back as a folder, and
`hf-hub:ORG/NAME[@REVISION]` resolves through huggingface_hub's cache (built here by hand, as huggingface_hub lays
it out: blobs, snapshots/<commit> links, refs) with the network off or refusing connections."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import pytest

from promptkd.checkpoints import file_sha256
from promptkd.cli import validate as v
from promptkd.cli.main import main
from test_deploy import student_run  # noqa: F401
from test_promptkd import teacher_backbone, teacher_ckpt  # noqa: F401

OLD, NEW = "a" * 40, "b" * 40


def _cli(*argv: str) -> tuple[int, str]:
    err = StringIO()
    with redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _seeds(run: Path, root: Path) -> Path:
    """A two-seed protocol layout (seed_N/student) around the distilled run, each seed with its results."""
    for seed, (base, new) in ((1, (0.80, 0.60)), (2, (0.70, 0.50))):
        folder = root / f"seed_{seed}" / "student"
        folder.mkdir(parents=True)
        for name in ("prompts.safetensors", "prompts.json", "teacher_features.safetensors", "teacher_features.json"):
            shutil.copyfile(run / name, folder / name)
        meta = json.loads((folder / "prompts.json").read_text())
        meta["train"]["seed"] = seed  # the same recipe, another seed
        meta["method_config"]["teacher_features"] = "/trained/elsewhere/teacher_features.safetensors"  # as on another
        # machine: the features are found beside the checkpoint (here, and in the Hub folder and cache)
        (folder / "prompts.json").write_text(json.dumps(meta))
        rows = [
            {"dataset": "toy", "seed": seed, "subsample": half, "split": "test", "protocol": "base2new", "metrics": m}
            for half, m in (("base", {"acc1": 0.1}), ("base", {"acc1": base}), ("new", {"acc1": new}))
        ]  # runs.jsonl is a history: the later base row is the result
        (folder / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "seed_1" / "student" / "prompts.safetensors"


@pytest.fixture(scope="module")
def hub_folder(student_run, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("hub")
    checkpoint = _seeds(student_run / "run", root / "proto")
    assert _cli("export", checkpoint, "--format", "hub", "--out", root / "repo")[0] == 0
    return root / "repo"


def _predictions(checkpoint: str, images: Path, out: Path) -> list[list[str]]:
    code, err = _cli("predict", checkpoint, images, "--out", out, "--no-progress", "--top-k", "2")
    assert code == 0, err
    return [row[1:] for row in csv.reader(out.open())]


@pytest.mark.slow
def test_export_hub_writes_a_model_repo_that_loads_back_as_a_folder(hub_folder, student_run, tmp_path):  # noqa: F811
    from huggingface_hub import ModelCard

    files = sorted(p.name for p in hub_folder.iterdir())
    parts = [f"{stem}.{ext}" for stem in ("prompts", "teacher", "teacher_features") for ext in ("json", "safetensors")]
    assert files == sorted(["README.md", "config.json", *parts])  # nothing else: upload_folder pushes all of it
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["files"] == {
        "checkpoint": "prompts.safetensors",
        "features": "teacher_features.safetensors",
        "teacher": "teacher.safetensors",
    }
    assert config["sha256"]["prompts.safetensors"] == file_sha256(student_run / "run" / "prompts.safetensors")
    card = ModelCard.load(hub_folder / "README.md")  # the Hub's own parser reads the front matter
    assert card.data.library_name == "promptkd" and "knowledge-distillation" in card.data.tags
    assert "| toy | 1 (these weights) | 80.00 | 60.00 | 68.57 |" in card.text
    assert "| toy | 2 | 70.00 | 50.00 | 58.33 |" in card.text
    assert v.features(str(hub_folder)) == str(hub_folder / "teacher_features.safetensors")
    assert v.teacher_checkpoint(str(hub_folder)) == str(hub_folder / "teacher.safetensors")
    images = student_run / "toy" / "images"
    own = _predictions(str(student_run / "run" / "prompts.safetensors"), images, tmp_path / "a.csv")
    assert _predictions(str(hub_folder), images, tmp_path / "b.csv") == own


def _fake_cache(cache: Path, repo: str, folder: Path, commit: str, refs: tuple[str, ...]) -> None:
    """``folder`` as huggingface_hub caches a download of ``repo`` at ``commit``: files in blobs/, linked from
    snapshots/<commit>/, and refs/<branch or tag> holding the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for file in sorted(folder.iterdir()):
        blob = root / "blobs" / file_sha256(file)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = root / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


def _two_commits(folder: Path, tmp_path: Path, monkeypatch) -> Path:
    """Two commits of org/pkd in a tmp Hub cache: the old one tagged v1, the new one main (its card differs)."""
    cache = tmp_path / "hf" / "hub"
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "README.md").write_text("old card\n")
    _fake_cache(cache, "org/pkd", old, OLD, ("v1",))
    _fake_cache(cache, "org/pkd", folder, NEW, ("main",))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache / "models--org--pkd" / "snapshots"


@pytest.fixture
def hub_cache(hub_folder, tmp_path, monkeypatch):
    """The exported run, cached as org/pkd."""
    return _two_commits(hub_folder, tmp_path, monkeypatch)


def _stand_in_repo(folder: Path) -> Path:
    """A Hub folder's config with empty stand-ins for its files: enough for checks that stop before loading."""
    folder.mkdir()
    files = {"checkpoint": "prompts.safetensors", "features": "teacher_features.safetensors"}
    (folder / "config.json").write_text(json.dumps({"format": "promptkd-hub", "files": files}))
    for stem in ("prompts", "teacher_features"):
        for suffix in (".safetensors", ".json"):
            (folder / (stem + suffix)).write_bytes(b"")
    (folder / "README.md").write_text("card\n")
    return folder


@pytest.fixture
def light_cache(tmp_path, monkeypatch):
    """org/pkd cached with stand-in files (no model is built): for the refusals."""
    return _two_commits(_stand_in_repo(tmp_path / "repo"), tmp_path, monkeypatch)


@pytest.mark.slow
def test_hf_hub_names_resolve_from_the_offline_cache_with_revision_pinning(hub_cache, student_run, tmp_path):  # noqa: F811
    assert v.checkpoint("hf-hub:org/pkd") == str(hub_cache / NEW / "prompts.safetensors")
    assert v.checkpoint("hf-hub:org/pkd@main") == str(hub_cache / NEW / "prompts.safetensors")
    assert v.checkpoint("hf-hub:org/pkd@v1") == str(hub_cache / OLD / "prompts.safetensors")
    assert v.features(f"hf-hub:org/pkd@{OLD}") == str(hub_cache / OLD / "teacher_features.safetensors")
    assert v.teacher_checkpoint("hf-hub:org/pkd") == str(hub_cache / NEW / "teacher.safetensors")
    images = student_run / "toy" / "images"
    own = _predictions(str(student_run / "run" / "prompts.safetensors"), images, tmp_path / "a.csv")
    assert _predictions("hf-hub:org/pkd@v1", images, tmp_path / "b.csv") == own  # loaded through the cache's links
    classes = tmp_path / "new.txt"
    classes.write_text("zebra\n")
    extend = ["features", "extend", "hf-hub:org/pkd", "--teacher", "hf-hub:org/pkd", "--classes", classes]
    code, err = _cli(*extend)  # the cached repo is never written into
    assert code == 2 and "is in the Hugging Face Hub cache" in err, err
    assert file_sha256(hub_cache / NEW / "teacher_features.json") == file_sha256(
        student_run / "run" / "teacher_features.json"
    )
    assert _cli(*extend, "--out", tmp_path / "more")[0] == 0  # the teacher and its features, both from the repo


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["inspect", "hf-hub:org"], "not a Hub model name"),
        (["inspect", "hf-hub:org/pkd@"], "hf-hub:ORG/NAME@REVISION"),
        (["inspect", "hf-hub:org/missing"], "`hf download org/missing` and copy"),
        (["inspect", "hf-hub:org/missing@v2"], "HF_HUB_OFFLINE=0"),
        (["inspect", "hf-hub:org/pkd@v9"], "revision 'v9' of org/pkd is not in the local Hub cache"),
        (["inspect", f"hf-hub:org/pkd@{'c' * 40}"], f"`hf download org/pkd --revision {'c' * 40}`"),
        (["features", "show", "hf-hub:org/clip"], "not a promptkd model"),
        (["features", "show", "hf-hub:org/teacher-only"], "holds no stored teacher features (it holds: checkpoint"),
    ],
)
def test_hf_hub_bad_names_exit_2_with_one_message(light_cache, tmp_path, argv, says):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "open_clip_config.json").write_text("{}")
    _fake_cache(light_cache.parent.parent, "org/clip", clip, OLD, ("main",))
    teacher_only = tmp_path / "teacher_only"
    teacher_only.mkdir()
    for name in ("prompts.safetensors", "prompts.json"):
        (teacher_only / name).symlink_to(light_cache / NEW / name)
    config = {
        "format": "promptkd-hub",
        "files": {"checkpoint": "prompts.safetensors", "teacher": "prompts.safetensors"},
    }
    (teacher_only / "config.json").write_text(json.dumps(config))
    _fake_cache(light_cache.parent.parent, "org/teacher-only", teacher_only, OLD, ("main",))
    code, err = _cli(*argv)
    assert code == 2 and says in err and "Traceback" not in err, err


def _refused_endpoint(monkeypatch) -> None:
    """The Hub 'online' but refusing every connection: huggingface_hub's real download path runs and fails."""
    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")


def test_hf_hub_unreachable_hub_uses_the_cache_or_says_what_to_run(light_cache, monkeypatch):
    _refused_endpoint(monkeypatch)
    assert v.checkpoint("hf-hub:org/pkd@v1") == str(light_cache / OLD / "prompts.safetensors")  # cached: used
    code, err = _cli("inspect", "hf-hub:org/missing")
    assert code == 2 and "the Hub cannot be reached" in err and "hf download org/missing" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_export_hub_refuses_a_folder_holding_other_files(tmp_path):
    checkpoint = _stand_in_repo(tmp_path / "run") / "prompts"
    out = tmp_path / "repo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _cli("export", checkpoint, "--format", "hub", "--out", out)
    assert code == 2 and "holds other files (notes.txt)" in err, err
    code, err = _cli(
        "export",
        checkpoint,
        "--format",
        "hub",
        "--out",
        tmp_path / "b",
        "--check-images",
        tmp_path,
    )
    assert code == 2 and "--check-images applies to --format torchscript/onnx" in err, err


def test_model_card_names_the_hub_base_models_and_averages_seeds_as_the_report_does():
    from huggingface_hub import ModelCard

    from promptkd.hub_export import _config, model_card

    teacher = {"method": "promptsrc", "backbone": {"model_name": "ViT-L-14"}}
    teacher["about"] = {"weights": "openai", "weights_source": "tag"}
    meta = {"method": "promptkd", "backbone": {"model_name": "ViT-B-16", "pretrained": "openai", "source": "tag"}}
    meta |= {"teacher": teacher, "classnames": ["cat", "dog"], "run": {"dataset": "pets"}}
    files = {"checkpoint": "prompts.safetensors", "features": "teacher_features.safetensors"}
    digests = dict.fromkeys(files.values(), "0" * 64)
    results = [
        {"dataset": "pets", "seed": s, "these_weights": s == 1, "base": b, "new": n, "hm": 2 * b * n / (b + n)}
        for s, b, n in ((1, 90.0, 50.0), (2, 50.0, 90.0))
    ]
    card = ModelCard(model_card(_config(meta, files, digests, results, [])))
    assert card.data.base_model == ["timm/vit_base_patch16_clip_224.openai", "timm/vit_large_patch14_clip_224.openai"]
    assert "| pets | mean of 2 | 70.00 | 70.00 | 70.00 |" in card.text  # not the mean of the seeds' HMs (64.29)
