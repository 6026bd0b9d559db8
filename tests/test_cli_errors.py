"""Bad input at the command line: one message naming the value or file and what to do, exit code 2, nothing lost
(issue 13's list: random weights only when asked, unwritable outputs, devices, counts, tags, paths, hints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from promptkd.cli.main import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.world import build_world

    root = tmp_path_factory.mktemp("world")
    build_world(root, scale=0.05, n_shift_test=20, n_pretrain=40, n_retrieval=40, workers=1)
    return ["--dataset", "shapes", "--data-root", str(root)]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_a_run_never_uses_random_weights_unless_asked(world, tmp_path, capsys):
    code, err = run(["zeroshot", *world, "--model", "pkd-tiny", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--pretrained random to start from random weights on purpose" in err
    code, err = run(["train", "--method", "coop", *world, "--model", "pkd-tiny", "--out",
                     str(tmp_path / "t")], capsys)  # fmt: skip
    assert code == 2 and "pkd-tiny has no weights promptkd ships" in err
    code, err = run(["distill", "--teacher-model", "pkd-tiny-wide", "--student-model", "pkd-world-student",
                     *world, "--out", str(tmp_path / "d")], capsys)  # fmt: skip
    assert code == 2 and "--teacher-pretrained random" in err
    from promptkd.backbones.loading import run_weights

    assert run_weights("pkd-world-student", None) == "shipped"  # shipped weights are the default
    assert run_weights("pkd-tiny", "random") is None


def test_outputs_that_cannot_be_written_fail_before_any_work(world, tmp_path, images, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run(["zeroshot", *world, "--model", "pkd-world-student", "--out", str(blocker)], capsys)
    assert code == 2 and "is a file, not a folder" in err
    code, err = run(["demo", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "argument --out:" in err and "a_file is a file, not a folder" in err
    checkpoint = tmp_path / "ck.safetensors"
    checkpoint.write_bytes(b"")  # never read: the output is refused first
    code, err = run(["predict", str(checkpoint), str(images), "--out", str(images)], capsys)
    assert code == 2 and "is a folder; give a file name" in err  # checked before the checkpoint is even read


def test_counts_devices_tags_and_paths(world, tmp_path, images, capsys):
    (tmp_path / "ck.safetensors").write_bytes(b"")
    code, err = run(["predict", str(tmp_path / "ck.safetensors"), str(images), "--top-k", "0"], capsys)
    assert code == 2 and "argument --top-k: must be a whole number of at least 1, got 0" in err
    code, err = run(["linear-probe", *world, "--model", "pkd-world-student", "--shots", "-2",
                     "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and "argument --shots: must be a whole number of at least 0, got -2" in err
    if not torch.cuda.is_available():
        code, err = run(["zeroshot", *world, "--model", "pkd-world-student", "--device", "cuda",
                         "--out", str(tmp_path)], capsys)  # fmt: skip
        assert code == 2 and "--device cuda: this machine has no CUDA GPU" in err
    code, err = run(["zeroshot", *world, "--model", "pkd-world-student", "--pretrained", "shiped",
                     "--out", str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and "Did you mean 'shipped'" in err
    missing = tmp_path / "nope" / "weights.safetensors"
    code, err = run(["zeroshot", *world, "--model", "pkd-tiny", "--pretrained", str(missing), "--out",
                     str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and f"weight file {missing} does not exist" in err


def test_hints_use_the_cli_spelling(tmp_path, capsys):
    from promptkd.data.items import DataError, ImageDataset

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="--skip-bad"):
        ImageDataset([str(bad)], None)[0]


def test_resume_mismatch_lists_the_keys_that_differ():
    from promptkd.engine.trainer import _differences

    old = {"train": {"lr": 0.002, "epochs": 10}, "classnames": [f"c{i}" for i in range(64)]}
    new = {"train": {"lr": 0.01, "epochs": 10}, "classnames": [f"c{i}" for i in range(60)]}
    lines = _differences(old, new, "run")
    assert lines[0].startswith("run.classnames: ['c0', 'c1', 'c2', ... (64 items)] -> ")
    assert lines[1] == "run.train.lr: 0.002 -> 0.01" and len(lines) == 2
    json.dumps(lines)


@pytest.fixture
def class_tree(tmp_path):
    """Your data as a newcomer has it: a folder per class (underscores in names) and a class list in another order."""
    root = tmp_path / "mydata"
    colours = {"red_square": (220, 30, 30), "blue_square": (30, 30, 220), "green_square": (30, 200, 30)}
    for k, (name, rgb) in enumerate(colours.items()):
        (root / name).mkdir(parents=True)
        for i in range(6):
            shade = tuple(max(0, c - 12 * i) for c in rgb)
            Image.new("RGB", (32, 32), shade).save(root / name / f"{k}{i}.png")
    names = tmp_path / "names.txt"
    names.write_text("green square\nred square\nblue square\n")
    rows = ["path,label"] + [f"{p.relative_to(root)},{k}" for k, d in enumerate(sorted(root.iterdir()))
                             for p in sorted(d.iterdir())]  # fmt: skip
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return root, names


def test_cli_takes_users_class_folders_and_lists(class_tree, tmp_path, capsys):
    root, names = class_tree
    common = ["--model", "pkd-world-student", "--out"]  # shipped weights: the same model in every run
    accuracies = []
    for extra in ([], ["--classnames", str(names)]):
        out = tmp_path / f"zs{len(extra)}"
        assert main(["zeroshot", "--dataset", str(root), *common, str(out), *extra]) == 0
        result = json.loads(next(out.glob("*.json")).read_text())
        assert result["num_classes"] == 3 and result["num_samples"] == 6  # 2 of 6 per class (50/20/30)
        accuracies.append(result["metrics"]["acc1"])
    assert accuracies[0] == accuracies[1]  # the list in another order is matched by name: same labels, same score
    assert main(["linear-probe", "--dataset", str(root), "--shots", "0", *common, str(tmp_path / "lp")]) == 0
    csv_run = ["train", "--method", "coop", "--preset", "world", "--dataset", str(root / "list.csv"), "--shots", "1"]
    csv_run += ["--classnames", str(tmp_path / "sorted.txt"), *common, str(tmp_path / "coop")]
    (tmp_path / "sorted.txt").write_text("blue square\ngreen square\nred square\n")
    assert main([*csv_run, "--set", "train.epochs=1", "train.progress=false"]) == 0
    distill = ["distill", "--teacher-model", "pkd-world-teacher", "--student-model", "pkd-world-student"]
    distill += ["--preset", "world", "--dataset", str(root), "--classnames", str(names)]
    distill += ["--out", str(tmp_path / "kd"), "--protocol", "all", "--set", "train.epochs=1", "train.batch_size=3"]
    assert main([*distill, "train.progress=false"]) == 0
    capsys.readouterr()


def test_images_are_read_faithfully(tmp_path, caplog):
    """16-bit PNGs scaled to 8 bits (PIL alone turns them white); images far below the input size warned about and
    counted; a corrupt file in an unlabelled folder found before training, even where sampling would not reach it."""
    import numpy as np

    from promptkd.backbones import PreprocessInfo
    from promptkd.data.items import DataError, ImageDataset, check_images, load_rgb
    from promptkd.data.transforms import eval_transform

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    pixels = np.asarray(load_rgb(str(tmp_path / "deep.png")))
    assert pixels.shape == (64, 64, 3) and pixels.min() == 0 and pixels.max() == 255
    assert abs(pixels.mean() - 127.5) < 1.0  # not all white (PIL's convert gives a mean near 254)

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "tiny.png")
    transform = eval_transform(PreprocessInfo(32, (0.5,) * 3, (0.5,) * 3))
    dataset = ImageDataset([str(tmp_path / "tiny.png"), str(tmp_path / "deep.png")], transform)
    with caplog.at_level("WARNING"):
        dataset[0], dataset[1], dataset[0]
    assert dataset.small == [str(tmp_path / "tiny.png")] and "far smaller than the model's 32 px input" in caplog.text

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i, i, i)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes((folder / "3.png").read_bytes()[:40])  # truncated
    paths = sorted(str(p) for p in folder.iterdir())
    with pytest.raises(DataError, match=r"1 of 4 images cannot be read:\n.*3\.png"):
        check_images(paths, source=str(folder))
    assert check_images(paths, skip_bad=True) == [str(folder / "3.png")]


def test_outputs_get_normal_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result gets what any new file gets (not 0600)."""
    import os

    from promptkd.checkpoints import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.json", "{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644


def test_zeroshot_on_a_folder_says_what_it_scores_and_keeps_earlier_results(tmp_path, capsys):
    """Issue 18 items 12 and 15: a folder's test part (30%) is scored and said so, --split all scores every image;
    an earlier result is never replaced unasked; images far below the input size are counted in the result even
    when loader workers read them (they cannot report back)."""
    root = tmp_path / "mine"
    for k, rgb in enumerate([(220, 30, 30), (30, 30, 220)]):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8) if k == 0 else (32, 32), rgb).save(root / f"class{k}" / f"{i}.png")
    out = tmp_path / "res"
    argv = ["zeroshot", "--dataset", str(root), "--model", "pkd-world-student", "--out", str(out), "--no-progress"]
    assert main([*argv, "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "scoring the test split, 6 of its 20 images (images split per class 50/20/30" in printed
    assert "--split all scores every image" in printed
    first = json.loads((out / "zeroshot-dataset-mine-zeroshot_classification.json").read_text())
    assert first["num_samples"] == 6 and first["dataset_images"] == 20
    assert first["small_images"] == 3  # class0's 8 px images in the test part, read by 2 worker processes
    code, err = run([*argv, "--workers", "0"], capsys)
    assert code == 2 and "already holds a result of this setting" in err and "--overwrite" in err
    assert json.loads((out / "zeroshot-dataset-mine-zeroshot_classification.json").read_text()) == first
    assert main([*argv, "--workers", "0", "--split", "all"]) == 0
    every = json.loads((out / "zeroshot-dataset-mine-all-zeroshot_classification.json").read_text())
    assert every["num_samples"] == 20 and every["small_images"] == 10  # every 8 px image of class0
    assert "scoring all 20 images" in capsys.readouterr().out
    assert main([*argv, "--workers", "2", "--overwrite"]) == 0


def test_demo_names_each_predicted_image_by_a_path_that_opens_it(world):
    """Every class has a 0050.png: the demo's lines give the path under the data root, unique and openable."""
    from promptkd.cli.demo import shown_path
    from promptkd.data.datasets import resolve_dataset

    root = Path(world[3])
    samples = resolve_dataset("shapes", root).test
    names = [Path(d.path).name for d in samples]
    assert len(set(names)) < len(names)  # file names repeat across class folders
    shown = [shown_path(d.path, root) for d in samples]
    assert len(set(shown)) == len(shown) and all((root / s).is_file() for s in shown)


def test_protocol_runner_never_passes_over_an_unreadable_result_in_silence(tmp_path, caplog):
    from promptkd.protocols.runner import _results_exist

    run_dir = tmp_path / "seed_1"
    run_dir.mkdir()
    (run_dir / "coop-shapes-classification.json").write_text('{"dataset": "shapes", "task": "class')  # truncated
    with caplog.at_level("WARNING", logger="promptkd"):
        assert not _results_exist(run_dir)
    assert "cannot be read" in caplog.text and "recomputed" in caplog.text
    assert (run_dir / "coop-shapes-classification.json.corrupt").is_file()  # kept, out of the report's way
    assert not (run_dir / "coop-shapes-classification.json").exists()


def test_weights_of_another_architecture_list_a_few_keys_and_the_count():
    from promptkd.checkpoints import CheckpointError, check_state_fits

    expected = {f"blocks.{i}.weight": torch.zeros(2) for i in range(140)}
    found = {f"stages.{i}.weight": torch.zeros(2) for i in range(140)}
    with pytest.raises(CheckpointError) as info:
        check_state_fits(expected, found, "other.safetensors")
    message = str(info.value)
    assert "... (132 more, 140 in all)" in message and message.count("blocks.") == 8 and len(message) < 1500


def test_offline_hint_names_the_option_the_command_has(monkeypatch):
    """distill's teacher is given with --teacher-pretrained: the offline hint says so (it said --pretrained)."""
    from promptkd.backbones import loading
    from promptkd.backbones.types import BackboneError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "is_cached", lambda cfg, cache_dir=None: False)
    with pytest.raises(BackboneError) as info:
        loading.run_weights("ViT-B-16", "openai", flag="--teacher-pretrained")
    message = str(info.value)
    assert "--teacher-pretrained /path/to/weights" in message and "--teacher-model local-dir:" in message
    assert " --pretrained " not in message


def test_a_caption_file_naming_a_missing_image_is_skipped_and_counted_with_skip_bad(tmp_path, caplog):
    """pretrain --skip-bad left a caption file's missing image fatal, and the hint named a key with no flag."""
    from promptkd.data.captions import CaptionCorpus
    from promptkd.data.items import DataError, ImageDataset

    (tmp_path / "images").mkdir()
    lines = []
    for i in range(3):
        if i < 2:
            Image.new("RGB", (32, 32), (90 * i, 20, 90)).save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a red star {i}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        CaptionCorpus.from_file(tmp_path / "captions.jsonl")
    assert "--skip-bad" in str(info.value) and "image_root" not in str(info.value)
    with caplog.at_level("WARNING"):
        corpus = CaptionCorpus.from_file(tmp_path / "captions.jsonl", skip_bad=True)
    assert len(corpus) == 3 and "1 of 3 listed images do not exist" in caplog.text
    images = ImageDataset(corpus.paths, None, skip_bad=True)
    [images[i] for i in range(len(images))]
    assert images.skipped == [str(tmp_path / "images" / "2.png")]  # counted as the run's skipped images


def test_caption_files_that_are_not_utf8_are_one_message(tmp_path):
    from promptkd.data.captions import CaptionCorpus
    from promptkd.data.items import DataError

    (tmp_path / "captions.jsonl").write_bytes('{"image": "a.png", "caption": "a caf\u00e9"}\n'.encode("latin-1"))
    (tmp_path / "coco.json").write_bytes('{"images": [], "annotations": [], "x": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"captions\.jsonl:1: not UTF-8 text"):
        CaptionCorpus.from_file(tmp_path / "captions.jsonl")
    with pytest.raises(DataError, match=r"coco\.json: not UTF-8 text"):
        CaptionCorpus.from_file(tmp_path / "coco.json")
