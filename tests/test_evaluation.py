"""Evaluation: transforms, metrics (hand-computed), zero-shot classifier and caches, features, linear probe, retrieval,
dataset resolution and the `zeroshot` command end to end on a tiny split-JSON dataset."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from promptkd.backbones import PreprocessInfo
from promptkd.data.datasets import DatasetNotFoundError, resolve_dataset
from promptkd.data.items import DataError, Datum, ImageDataset
from promptkd.data.transforms import build_transform, eval_transform, train_transform
from promptkd.evaluation import (
    CaptionSet,
    LinearProbeError,
    TemplateError,
    build_prompts,
    classification_metrics,
    clear_text_cache,
    evaluate_linear_probe,
    evaluate_retrieval,
    evaluate_zeroshot,
    expected_calibration_error,
    extract_features,
    harmonic_mean,
    linear_probe,
    mean_per_class_recall,
    read_coco_captions,
    read_flickr_captions,
    resolve_templates,
    retrieval_recall,
    search_c,
    topk_accuracy,
    zeroshot_classifier,
)
from promptkd.evaluation.linear_probe import COARSE_GRID
from promptkd.evaluation.zeroshot import read_template_file

COLOURS = {"red square": (220, 40, 40), "green circle": (40, 170, 60), "blue triangle": (45, 85, 225)}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures written in tmp_path


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """A flat-colour PNG with a little deterministic variation so images differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shift = (seed * 7) % 20
    Image.new("RGB", size, tuple(min(255, c + shift) for c in colour)).save(path, format="PNG")
    return path


def write_split_dataset(
    root: Path,
    folder: str = "toyset",
    split_name: str = "Toy",
    counts: tuple[int, int, int] = (3, 2, 2),
    image_dir: str = "images",
) -> Path:
    """``root/folder/split_zhou_<split_name>.json`` + PNGs under ``image_dir``, 3 colour classes (the shared layout)."""
    dataset_dir = root / folder
    prefix = dataset_dir / image_dir if image_dir else dataset_dir
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, (name, colour) in enumerate(COLOURS.items()):
        for which, n in zip(("train", "val", "test"), counts):
            for i in range(n):
                rel = f"{name.replace(' ', '_')}/{which}_{i}.png"
                write_png(prefix / rel, colour, seed=i + 10 * label)
                split[which].append([rel, label, name])
    (dataset_dir / f"split_zhou_{split_name}.json").write_text(json.dumps(split))
    return dataset_dir


def items_of(dataset_dir: Path, which: str) -> list[Datum]:
    split = json.loads(next(dataset_dir.glob("split_zhou_*.json")).read_text())
    return [Datum(str(dataset_dir / "images" / p), y, c) for p, y, c in split[which]]


# ---------------------------------------------------------------------------------------------------------------
# Transforms


def test_eval_transform_keeps_aspect_and_uses_model_interpolation():
    info = PreprocessInfo(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
    transform = eval_transform(info)
    resize = transform.transforms[0]
    assert resize.size == 32 and resize.interpolation.value == "bilinear"  # shorter side only: aspect kept
    image = Image.new("RGB", (64, 40), (255, 0, 128))
    out = transform(image)
    assert out.shape == (3, 32, 32)
    expected = (torch.tensor([255, 0, 128]) / 255 - 0.5) / 0.25
    assert torch.allclose(out[:, 16, 16], expected, atol=0.02)
    squashed = eval_transform(PreprocessInfo(32, (0.5,) * 3, (0.25,) * 3, "bicubic", "squash")).transforms[0]
    assert tuple(squashed.size) == (32, 32)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_batch_normalized_decoding_equals_the_per_image_transform_bit_for_bit(resize_mode):
    """predict's decoder normalises whole batches and takes images already at the input size straight to a tensor;
    the result must be exactly the per-image transform's, for every resize mode and image mode."""
    from promptkd.data.items import _to_rgb
    from promptkd.data.transforms import BatchNormalized

    info = PreprocessInfo(24, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), "bicubic", resize_mode)
    transform = eval_transform(info)
    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
        for h, w in ((24, 24), (40, 31), (17, 60), (24, 25))
    ]
    images += [_to_rgb(images[0].convert(mode)) for mode in ("RGBA", "L", "P")]
    batched = BatchNormalized.of(transform)
    assert batched is not None and BatchNormalized.of(T.Compose([T.ToTensor()])) is None
    assert batched.unchanged_at == 24 and BatchNormalized.of(train_transform(info)).unchanged_at is None
    got = batched.stack([batched.per_image(image) for image in images])
    assert torch.equal(got, torch.stack([transform(image) for image in images]))

    class Changed(T.CenterCrop):  # a crop that is not the plain centre crop: no shortcut taken
        pass

    odd = BatchNormalized(T.Compose([transform.transforms[0], Changed(24), *transform.transforms[2:]]))
    assert odd.unchanged_at is None


def test_train_transform_is_the_dassl_recipe():
    info = PreprocessInfo(size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    names = [type(t).__name__ for t in train_transform(info).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    crop = build_transform(info, train=True).transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.size == (32, 32) and crop.interpolation.value == "bicubic"
    assert build_transform(info, train=True)(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_accuracy_and_mean_per_class_recall_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 2])  # predictions 0, 1, 2, 0: rows 0 and 2 right
    assert topk_accuracy(logits, labels, 1) == pytest.approx(0.5)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(0.75)  # row 3's label is its last choice
    assert topk_accuracy(logits, labels, 5) == pytest.approx(1.0)  # k clamped to the 3 classes
    assert mean_per_class_recall(logits, labels) == pytest.approx((1 + 1 / 3) / 2)  # class 1 absent: not averaged
    metrics = classification_metrics(logits, labels)
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall", "ece"}


def test_ece_by_hand_and_against_a_loop():
    probs = torch.tensor([[0.9, 0.1], [0.58, 0.42], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0])
    # bins of width 1/15: {0.9} right, {0.7} right, {0.58, 0.55} both wrong.
    expected = 0.25 * 0.1 + 0.25 * 0.3 + 0.5 * abs(0 - (0.58 + 0.55) / 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=gen) * 3
    labels = torch.randint(0, 7, (200,), generator=gen)
    p = logits.softmax(1).double()
    conf, pred = p.max(1)
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            acc = (pred[inside] == labels[inside]).double().mean()
            total += inside.double().mean().item() * abs(acc.item() - conf[inside].mean().item())
    assert classification_metrics(logits, labels)["ece"] == pytest.approx(total, abs=1e-6)


def test_harmonic_mean():
    assert round(harmonic_mean(69.34, 74.22), 2) == 71.70
    assert round(harmonic_mean(86.96, 80.73), 2) == 83.73
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(float("nan"), 50.0))


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot


CLASSES = ["red star", "blue ring", "green cross"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{} texture."]


def test_ensemble_normalises_per_template_then_averages_then_renormalises(tiny_backbone):
    clear_text_cache()
    weights = zeroshot_classifier(tiny_backbone, CLASSES, TEMPLATES)
    assert weights.shape == (tiny_backbone.embed_dim, len(CLASSES))
    with torch.no_grad():
        raw = [
            tiny_backbone.model.encode_text(tiny_backbone.tokenize([t.format(c) for c in CLASSES])) for t in TEMPLATES
        ]
    manual = F.normalize(torch.stack([F.normalize(r, dim=-1) for r in raw]).mean(0), dim=-1).T
    assert torch.allclose(weights, manual, atol=1e-5)
    assert torch.allclose(weights.norm(dim=0), torch.ones(len(CLASSES)), atol=1e-5)
    wrong = F.normalize(torch.stack(raw).mean(0), dim=-1).T  # averaging before normalising weights long prompts
    assert not torch.allclose(weights, wrong, atol=1e-4)


def test_text_features_are_cached_in_memory_and_on_disk(tiny_backbone, monkeypatch, tmp_path):
    clear_text_cache()
    calls = []
    original = tiny_backbone.model.encode_text

    def counting(ids, *args, **kwargs):
        calls.append(ids.shape[0])
        return original(ids, *args, **kwargs)

    monkeypatch.setattr(tiny_backbone.model, "encode_text", counting)
    first = zeroshot_classifier(tiny_backbone, CLASSES, TEMPLATES, cache_dir=tmp_path)
    assert sum(calls) == len(CLASSES) * len(TEMPLATES)
    again = zeroshot_classifier(tiny_backbone, CLASSES, TEMPLATES, cache_dir=tmp_path)
    assert sum(calls) == len(CLASSES) * len(TEMPLATES)  # memory hit
    assert torch.equal(first, again)
    zeroshot_classifier(tiny_backbone, CLASSES, TEMPLATES[:1])
    assert sum(calls) == len(CLASSES) * (len(TEMPLATES) + 1)  # other templates: a miss
    clear_text_cache()
    from_disk = zeroshot_classifier(tiny_backbone, CLASSES, TEMPLATES, cache_dir=tmp_path)
    assert sum(calls) == len(CLASSES) * (len(TEMPLATES) + 1)  # disk hit
    assert torch.equal(first, from_disk)
    zeroshot_classifier(tiny_backbone, CLASSES, TEMPLATES, use_cache=False)
    assert sum(calls) == len(CLASSES) * (2 * len(TEMPLATES) + 1)


def test_template_formats_and_sets(tmp_path):
    assert build_prompts(["cat"], ["a {}.", "a {c}!", lambda c: f"{c}?"]) == [["a cat.", "a cat!", "cat?"]]
    assert build_prompts(["cat", "dog"], {"cat": ["meow"], "dog": ["woof", "bark"]}) == [["meow"], ["woof", "bark"]]
    with pytest.raises(TemplateError):
        build_prompts(["cat"], ["no placeholder"])
    assert resolve_templates("single", "dtd") == ["a photo of a {}."]
    assert resolve_templates("dataset", "dtd") == ["{} texture."]
    assert resolve_templates("ensemble", "dtd")[-1] == "{} texture." and len(resolve_templates("ensemble", "dtd")) == 8
    assert len(resolve_templates("ensemble", "imagenet")) == 7 and len(resolve_templates("openai")) == 80
    assert resolve_templates("ensemble", "shapes", ensemble=["{}."]) == ["{}."]
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"dtd": ["a {c} texture."], "imagenet1k": ["a photo of a {c}."]}))
    assert resolve_templates(str(path), "dtd") == ["a {c} texture."]
    assert read_template_file(path, "eurosat") == ["a photo of a {c}."]  # CLIP_benchmark's fallback
    with pytest.raises(TemplateError, match="unknown template set"):
        resolve_templates("bogus", "dtd")


def test_evaluate_zeroshot_matches_its_logits(tiny_backbone, tmp_path):
    dataset_dir = write_split_dataset(tmp_path)
    items = items_of(dataset_dir, "test")
    result = evaluate_zeroshot(tiny_backbone, items, list(COLOURS), ["a photo of a {}."], keep_logits=True)
    assert result.num_samples == len(items) == 6 and result.num_classes == 3
    assert result.logits.shape == (6, 3)
    assert result.metrics["acc1"] == pytest.approx(topk_accuracy(result.logits, result.labels, 1))
    assert result.labels.tolist() == [d.label for d in items]


# ---------------------------------------------------------------------------------------------------------------
# Features


def test_feature_cache_hits_and_invalidates_on_file_change(tiny_backbone, tmp_path):
    dataset_dir = write_split_dataset(tmp_path / "data")
    items = items_of(dataset_dir, "train")
    transform = eval_transform(tiny_backbone.preprocess)
    cache = tmp_path / "cache"
    first = extract_features(tiny_backbone, ImageDataset(items, transform), cache_dir=cache, progress=False)
    assert not first.from_cache and first.features.shape == (len(items), tiny_backbone.embed_dim)
    second = extract_features(tiny_backbone, ImageDataset(items, transform), cache_dir=cache, progress=False)
    assert second.from_cache and torch.equal(first.features, second.features)
    write_png(Path(items[0].path), (0, 0, 0), size=(40, 32))  # the file changes: the key changes
    third = extract_features(tiny_backbone, ImageDataset(items, transform), cache_dir=cache, progress=False)
    assert not third.from_cache and not torch.equal(third.features[0], first.features[0])
    with torch.no_grad():
        direct = tiny_backbone.model.encode_image(
            torch.stack([transform(Image.open(d.path).convert("RGB")) for d in items])
        )
    assert torch.allclose(third.features, direct, atol=1e-5)


def test_damaged_feature_cache_is_recomputed_not_used(tiny_backbone, tmp_path):
    dataset_dir = write_split_dataset(tmp_path / "data")
    items = items_of(dataset_dir, "train")
    transform = eval_transform(tiny_backbone.preprocess)
    cache = tmp_path / "cache"
    first = extract_features(tiny_backbone, ImageDataset(items, transform), cache_dir=cache, progress=False)
    (stored,) = cache.glob("features-*.safetensors")
    data = bytearray(stored.read_bytes())
    data[-8] ^= 0xFF  # inside the last tensor: safetensors would load it as another number
    stored.write_bytes(bytes(data))
    again = extract_features(tiny_backbone, ImageDataset(items, transform), cache_dir=cache, progress=False)
    assert not again.from_cache and torch.equal(again.features, first.features)


def test_model_identity_tracks_weights_and_precision(tiny_backbone, wide_backbone):
    import dataclasses

    from promptkd.evaluation import model_identity

    assert model_identity(tiny_backbone) == model_identity(tiny_backbone)
    assert model_identity(tiny_backbone) != model_identity(wide_backbone)
    assert model_identity(tiny_backbone) != model_identity(dataclasses.replace(tiny_backbone, precision="bf16"))


def test_unreadable_images_are_dropped_and_listed(tiny_backbone, tmp_path):
    dataset_dir = write_split_dataset(tmp_path)
    items = items_of(dataset_dir, "train")
    Path(items[1].path).write_bytes(b"not a png")
    transform = eval_transform(tiny_backbone.preprocess)
    with pytest.raises(DataError, match="cannot read image"):
        extract_features(tiny_backbone, ImageDataset(items, transform), progress=False)
    dataset = ImageDataset(items, transform, skip_bad=True)
    feats = extract_features(tiny_backbone, dataset, batch_size=4, progress=False)
    assert len(feats) == len(items) - 1 and feats.skipped == [items[1].path]
    assert 1 not in feats.indices.tolist() and feats.labels.tolist() == [d.label for i, d in enumerate(items) if i != 1]


# ---------------------------------------------------------------------------------------------------------------
# Linear probe


def _clusters(n_per_class: int, seed: int, noise: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(4, 8) * 2
    labels = torch.arange(4).repeat_interleave(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), 8, generator=gen), labels


def test_linear_probe_chooses_c_on_validation_only():
    train, val, test = _clusters(6, 0), _clusters(3, 1), _clusters(10, 2)
    result = linear_probe(train, val, test, num_classes=4, refine_steps=4)
    shuffled = (test[0], test[1][torch.randperm(len(test[1]), generator=torch.Generator().manual_seed(3))])
    other = linear_probe(train, val, shuffled, num_classes=4, refine_steps=4)
    assert other.C == result.C  # test labels cannot move the choice
    assert other.metrics["lp_acc1"] != result.metrics["lp_acc1"]
    sel = result.selection
    assert sel["split"] == "val" and sel["test_used_for_selection"] is False and sel["chosen_C"] == result.C
    tried = [s["C"] for s in sel["search"]]
    assert tried[: len(COARSE_GRID)] == pytest.approx(list(COARSE_GRID))
    assert len(set(tried)) == len(tried) <= len(COARSE_GRID) + 2 * 4
    assert {s["stage"] for s in sel["search"][len(COARSE_GRID) :]} == {"refine"}
    best = max(s["val_acc1"] for s in sel["search"])
    assert sel["val_acc1"] == best
    chosen_c, steps = search_c(train, val, num_classes=4, refine_steps=4)  # the search never sees the test split
    assert chosen_c == result.C and len(steps) == len(tried)
    again = linear_probe(train, val, test, num_classes=4, refine_steps=4)
    assert again.C == result.C and again.metrics == result.metrics  # deterministic
    assert set(result.metrics) >= {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "lp_ece"}
    assert result.metrics["lp_acc1"] > 0.8


def test_linear_probe_fixed_c_and_missing_validation(tiny_backbone, tmp_path):
    train, test = _clusters(6, 0), _clusters(5, 2)
    fixed = linear_probe(train, None, test, num_classes=4, C=1.0)
    assert fixed.C == 1.0 and fixed.selection["search"] == []
    with pytest.raises(LinearProbeError):
        linear_probe(train, None, test, num_classes=4)
    splits = resolve_dataset("toyset", write_split_dataset(tmp_path, counts=(2, 0, 1)).parent)
    with pytest.raises(LinearProbeError, match="no validation split"):
        evaluate_linear_probe(tiny_backbone, splits, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Retrieval


def test_retrieval_recall_on_a_constructed_case():
    images = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])  # image 3: no caption (distractor)
    texts = torch.tensor(
        [
            [1.0, 0.1, 0],  # image 0, ranks it first
            [0.2, 1.0, 0],  # image 0, ranks it second
            [0, 1.0, 0.1],  # image 1, first
            [0, 0.05, 1.0],  # image 1, second (image 2 first)
            [0.1, 0, 1.0],  # image 2, first
            [0.3, 0, 1.0],  # image 2, first
        ]
    )
    owners = [0, 0, 1, 1, 2, 2]
    metrics = retrieval_recall(images, texts, owners, ks=(1, 2, 10))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(4 / 6)  # text -> image
    assert metrics["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image -> text: image 0 -> caption 0 (own), image 1 -> caption 2 (own), image 2 -> caption 3 (image 1's).
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert metrics["text_retrieval_recall@10"] == pytest.approx(1.0)
    chunked = retrieval_recall(images, texts, owners, ks=(1, 2, 10), chunk=2)
    assert chunked == metrics


def test_caption_readers_and_their_errors(tmp_path):
    for name in ("a.png", "b.png"):
        write_png(tmp_path / "images" / name, (10, 20, 30))
    coco = {
        "images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}],
        "annotations": [{"image_id": 9, "caption": "b one"}, {"image_id": 7, "caption": " a one "}],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    captions = read_coco_captions(path)
    assert [Path(p).name for p in captions.images] == ["a.png", "b.png"]
    assert captions.captions == ["b one", "a one"] and captions.caption_image == [1, 0]
    coco["annotations"].append({"image_id": 3, "caption": "orphan"})
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="image id 3"):
        read_coco_captions(path)

    csv = tmp_path / "results.csv"
    csv.write_text("image_name| comment_number| comment\na.png| 0| a dog .\na.png| 1| a cat .\nb.png| 0| a bird .\n")
    captions = read_flickr_captions(csv, tmp_path / "images")
    assert captions.captions == ["a dog .", "a cat .", "a bird ."] and captions.caption_image == [0, 0, 1]
    csv.write_text("image_name| comment_number| comment\na.png| 0| a dog .\nb.png| 4 a bird runs .\n")
    with pytest.raises(DataError) as info:
        read_flickr_captions(csv, tmp_path / "images")
    assert f"{csv}:3" in str(info.value)
    token = tmp_path / "results_20130124.token"
    token.write_text("a.png#0\ta dog .\nb.png#0\ta bird .\n")
    assert read_flickr_captions(token, tmp_path / "images").caption_image == [0, 1]
    token.write_text("a.png#0\ta dog .\nb.png a bird .\n")
    with pytest.raises(DataError, match="malformed row"):
        read_flickr_captions(token, tmp_path / "images")


def test_evaluate_retrieval_end_to_end(tiny_backbone, tmp_path):
    paths = [str(write_png(tmp_path / f"{i}.png", colour, seed=i)) for i, colour in enumerate(COLOURS.values())]
    captions = CaptionSet(paths, [f"a {c}" for c in COLOURS for _ in range(2)], [0, 0, 1, 1, 2, 2])
    result = evaluate_retrieval(tiny_backbone, captions, ks=(1, 5), progress=False)
    assert result.num_images == 3 and result.num_captions == 6
    assert set(result.metrics) == {f"{w}_retrieval_recall@{k}" for w in ("image", "text") for k in (1, 5)}
    assert result.metrics["image_retrieval_recall@5"] == 1.0  # only 3 images: K is clamped


# ---------------------------------------------------------------------------------------------------------------
# Dataset resolution and the CLI


def test_resolve_dataset_world_layout_generic_folder_and_errors(tmp_path):
    write_split_dataset(tmp_path, folder="shapes", split_name="WorldShapes")
    splits = resolve_dataset("shapes", tmp_path)
    assert splits.classnames == list(COLOURS) and len(splits.test) == 6
    assert splits.template == "a photo of a {}, a type of shape."  # the world's own template
    generic = resolve_dataset("toyset", write_split_dataset(tmp_path).parent)
    assert generic.name == "toyset" and len(generic.train) == 9 and generic.template == "a photo of a {}."
    assert Path(generic.train[0].path).is_file()
    assert resolve_dataset(str(tmp_path / "toyset"), None).name == "toyset"
    with pytest.raises(DataError, match="split_zhou_WorldPatterns.json"):
        resolve_dataset("patterns", tmp_path)
    with pytest.raises(DataError, match="dtd"):
        resolve_dataset("dtd", tmp_path)  # a benchmark whose folder is missing
    with pytest.raises(DatasetNotFoundError, match="Known datasets"):
        resolve_dataset("no_such_set", tmp_path)


def _run_cli(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_cli_zeroshot_writes_a_result_json(tmp_path, capsys):
    from promptkd.cli import zeroshot

    write_split_dataset(tmp_path / "data")
    out = tmp_path / "out"
    common = [
        "--dataset",
        "toyset",
        "--data-root",
        str(tmp_path / "data"),
        "--model",
        "pkd-tiny",
        "--pretrained",
        "random",
        "--out",
        str(out),
    ]
    common += ["--workers", "0", "--no-progress"]
    assert _run_cli(zeroshot, [*common, "--subsample", "base", "--templates", "ensemble"]) == 0
    assert "| toyset " in capsys.readouterr().out
    path = out / "zeroshot-ensemble-toyset-base-zeroshot_classification.json"
    result = json.loads(path.read_text())
    for key in ("dataset", "model", "pretrained", "task", "metrics", "language"):  # CLIP_benchmark's keys
        assert key in result
    assert (
        result["dataset"] == "toyset" and result["model"] == "pkd-tiny" and result["task"] == "zeroshot_classification"
    )
    assert result["subsample"] == "base" and result["protocol"] == "base2new" and result["split"] == "test"
    assert result["num_classes"] == 2 and result["num_samples"] == 4 and result["skipped_images"] == 0
    assert result["classnames"] == ["red square", "green circle"] and len(result["templates"]) == 8
    assert 0.0 <= result["metrics"]["acc1"] <= 1.0 and len(result["config_hash"]) == 16
    rows = (out / "runs.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["file"] == path.name
