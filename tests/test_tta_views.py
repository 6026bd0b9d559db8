"""TPT's views as its code makes them (op magnitudes, chains, float mixing, bilinear crops), per-family defaults of
TPT and C-TPT, and ECE with C-TPT's 20 bins. The reference rules restated here are azshue/TPT's ``augmix_ops.py``
and ``datautils.augmix``; C-TPT's are its scripts and its ``ECE_Loss``."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from promptkd.backbones.types import PreprocessInfo
from promptkd.data.items import Datum
from promptkd.data.transforms import seeded_cpu_rng
from promptkd.evaluation.metrics import ECE_BINS, TTA_ECE_BINS, expected_calibration_error
from promptkd.tta import views as V
from promptkd.tta.base import TTAConfig, TTAError
from promptkd.tta.views import TPTAugMix, TTAViewDataset, ViewConfig, dataset_family, dataset_settings, image_seed

PREPROCESS = PreprocessInfo(
    size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic"
)
DRAWS = 6000


def _reference_rule(op: str, level: float, size: int) -> float:
    """|parameter| the reference computes from a level (augmix_ops.py, severity 1), translations scaled to `size`."""
    return {
        "posterize": 4 - int(level * 4 / 10),
        "solarize": 256 - int(level * 256 / 10),
        "rotate": int(level * 30 / 10),
        "shear_x": level * 0.3 / 10,
        "translate_x": int(level * (224 / 3) / 10) * size / 224,
    }[op]


def _draws(op: str, size: int, n: int = DRAWS) -> np.ndarray:
    with seeded_cpu_rng(11):
        return np.array([V.op_parameter(op, size) for _ in range(n)])


@pytest.mark.parametrize(
    ("op", "size", "low", "high"),
    [
        ("rotate", 224, 0, 2),  # degrees
        ("shear_x", 224, 0.003, 0.03),
        ("translate_x", 224, 0, 7),  # pixels at 224
        ("translate_x", 32, 0, 1),  # the same fraction of a 32 px image
        ("solarize", 224, 231, 254),  # threshold
        ("posterize", 224, 4, 4),  # bits kept
    ],
)
def test_op_magnitudes_follow_the_reference_rules(op, size, low, high):
    """Level ~ uniform(0.1, 1) per op call, scaled as the reference: ranges, means and signs of many draws."""
    values = _draws(op, size)
    magnitude = np.abs(values)
    assert magnitude.min() == pytest.approx(low, abs=1e-3) and magnitude.max() == pytest.approx(high, abs=1e-3)
    grid = np.linspace(0.1, 1.0, 90001)[:-1]  # the exact distribution of the level, finely
    exact = np.array([_reference_rule(op, float(level), size) for level in grid])
    assert set(np.round(magnitude, 6)) <= set(np.round(exact, 6)) or op == "shear_x"
    spread = exact.std() / math.sqrt(DRAWS)
    assert abs(magnitude.mean() - exact.mean()) < 4 * spread + 1e-9
    if op in ("rotate", "shear_x", "translate_x"):  # a random sign, as the reference's uniform() > 0.5
        moved = values[magnitude > 0]
        assert abs((moved < 0).mean() - 0.5) < 0.03


def test_rotation_frequencies_at_severity_one():
    """0, 1 and 2 degrees with the reference's odds (7/27, 10/27, 10/27); torchvision's AugMix(severity=1) never
    rotates at all."""
    counts = Counter(np.abs(_draws("rotate", 224)).astype(int).tolist())
    for degrees, share in ((0, 7 / 27), (1, 10 / 27), (2, 10 / 27)):
        assert counts[degrees] / DRAWS == pytest.approx(share, abs=0.025)


def test_chains_draw_one_to_three_ops_uniformly_from_the_nine(monkeypatch):
    calls: list[list[str]] = []

    def record(image, op, value):
        calls[-1].append(op)
        return image

    monkeypatch.setattr(V, "apply_op", record)
    augmix = TPTAugMix(32)
    image = Image.new("RGB", (32, 32))
    with seeded_cpu_rng(3):
        for _ in range(3000):
            calls.append([])
            augmix.chain(image)
    depths = Counter(len(chain) for chain in calls)
    assert set(depths) == {1, 2, 3} and all(abs(depths[d] / 3000 - 1 / 3) < 0.03 for d in (1, 2, 3))
    ops = Counter(op for chain in calls for op in chain)
    assert set(ops) == set(V.AUGMIX_OPS) and len(V.AUGMIX_OPS) == 9
    total = sum(ops.values())
    assert all(abs(count / total - 1 / 9) < 0.015 for count in ops.values())


def _noise_image(path: Path, size: int = 48) -> Path:
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(size, size + 8, 3) * 255).astype("uint8")).save(path)
    return path


def test_augmix_mixes_normalised_floats_as_the_reference(tmp_path):
    """m · N(crop) + (1 - m) · Σ w_i · N(chain_i) with the same draws, N = ToTensor + Normalize; and the views are not
    8-bit images (torchvision's AugMix mixes uint8, so every un-normalised value is a multiple of 1/255)."""
    crop = Image.open(_noise_image(tmp_path / "a.png")).convert("RGB").resize((32, 32))
    augmix = TPTAugMix(32)
    normalise = T.Compose([T.ToTensor(), T.Normalize(PREPROCESS.mean, PREPROCESS.std)])
    with seeded_cpu_rng(5):
        ours = T.functional.normalize(augmix(crop), PREPROCESS.mean, PREPROCESS.std)
    with seeded_cpu_rng(5):  # replay the draws in __call__'s order: weights, then the chains
        weights = augmix.coefficients()
        chains = [augmix.chain(crop) for _ in range(3)]
    assert weights.min() >= 0 and float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    reference = weights[0] * normalise(crop) + (1 - weights[0]) * sum(
        w / (1 - weights[0]) * normalise(c) for w, c in zip(weights[1:], chains)
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)

    item = Datum(str(tmp_path / "a.png"), 0, "x")
    views = TTAViewDataset([item], PREPROCESS, ViewConfig(n_views=8, augmix=True)).views(
        Image.open(item.path).convert("RGB"), item.path
    )
    mean, std = torch.tensor(PREPROCESS.mean).view(3, 1, 1), torch.tensor(PREPROCESS.std).view(3, 1, 1)
    levels = (views[1:] * std + mean) * 255
    assert ((levels - levels.round()).abs() > 1e-3).float().mean() > 0.5


def test_crop_views_are_bilinear_random_resized_crops_with_flip(tmp_path):
    """Without AugMix, view k is RandomResizedCrop(size, scale=(0.08, 1)) with bilinear interpolation (the
    reference's default, though the model's own preprocessing is bicubic) + flip, seeded by the image's path."""
    path = str(_noise_image(tmp_path / "b.png"))
    config = ViewConfig(n_views=6, seed=2)
    image = Image.open(path).convert("RGB")
    views = TTAViewDataset([Datum(path, 0, "x")], PREPROCESS, config).views(image, path)
    replay = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.08, 1.0), interpolation=InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(PREPROCESS.mean, PREPROCESS.std),
        ]
    )
    with seeded_cpu_rng(image_seed(2, path)):
        expected = torch.stack([replay(image) for _ in range(5)])
    torch.testing.assert_close(views[1:], expected, atol=1e-6, rtol=0)


def test_dataset_families_and_per_family_defaults():
    from promptkd.tta.methods.ctpt import CTPT, CTPTConfig

    for name in ("imagenet", "imagenet_sketch", "ImageNetV2", "shapes", "shapes_sketch", "WorldShapesNoise"):
        assert dataset_family(name) == "imagenet", name
    for name in ("dtd", "eurosat", "patterns", "counts", "my_folder"):
        assert dataset_family(name) == "fine_grained", name
    # TPT: AugMix on the fine-grained family only
    assert dataset_settings(TTAConfig(), "shapes_sketch").augmix == "off"
    assert dataset_settings(TTAConfig(), "patterns").augmix == "on"
    assert dataset_settings(TTAConfig(augmix="on"), "shapes").augmix == "on"  # what the user set is kept
    # C-TPT: λ 20 with AugMix on the ImageNet family, 50 (AugMix) on the fine-grained
    shift = dataset_settings(CTPTConfig(), "shapes_noise")
    assert (shift.augmix, shift.dispersion_weight) == ("on", 20.0)
    fine = dataset_settings(CTPTConfig(), "dtd")
    assert (fine.augmix, fine.dispersion_weight) == ("on", 50.0)
    assert dataset_settings(CTPTConfig(dispersion_weight=7.0, augmix="off"), "shapes").dispersion_weight == 7.0
    with pytest.raises(TTAError, match="dispersion_weight"):
        CTPT(None, CTPTConfig())  # type: ignore[arg-type]


def _toy(root: Path) -> Path:
    folder = root / "toyfine"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(("red thing", "blue thing")):
        rel = f"{label}/test.png"
        (folder / "images" / str(label)).mkdir(parents=True)
        rng = random.Random(label)
        image = Image.new("RGB", (40, 40), ((200, 30, 30), (30, 30, 200))[label])
        for _ in range(40):
            image.putpixel((rng.randrange(40), rng.randrange(40)), (rng.randrange(256),) * 3)
        image.save(folder / "images" / rel)
        split["test"].append([rel, label, name])
    (folder / "split_zhou_Toy.json").write_text(json.dumps(split))
    return folder


@pytest.mark.parametrize(("overrides", "weight"), [([], 50.0), (["method.dispersion_weight=30"], 30.0)])
def test_ctpt_run_records_effective_defaults_and_20_bin_ece(tmp_path, monkeypatch, overrides, weight):
    """`tta --method ctpt` on a fine-grained set: λ 50 with AugMix unless --set says otherwise; the result JSON holds
    the values used; ECE over C-TPT's 20 bins."""
    from promptkd.evaluation import metrics as metrics_module
    from promptkd.tta.run import resolve_tta_config, run_tta

    bins: list[int] = []
    original = metrics_module.classification_metrics

    def spy(logits, labels, **kwargs):
        bins.append(kwargs.get("n_bins", ECE_BINS))
        return original(logits, labels, **kwargs)

    monkeypatch.setattr(metrics_module, "classification_metrics", spy)
    base = {
        "method": "ctpt",
        "datasets": [str(_toy(tmp_path))],
        "model": "pkd-tiny",
        "pretrained": "random",
        "batch_size": 2,
        "progress": False,
        "device": "cpu",
        "out": str(tmp_path / "out"),
    }
    torch.manual_seed(0)
    outcome = run_tta(resolve_tta_config(None, ["method.n_views=4", *overrides], base))
    (record,) = outcome.results
    saved = json.loads(next((tmp_path / "out").glob("ctpt-*.json")).read_text())
    assert saved["method_config"] == record["method_config"]
    settings = record["method_config"]
    assert settings["dispersion_weight"] == weight and settings["augmix"] == "on"
    assert bins and set(bins) == {TTA_ECE_BINS} and TTA_ECE_BINS == 20


def _ctpt_reference_ece(confidences: list[float], correct: list[bool], n_bins: int) -> float:
    """C-TPT's ECE_Loss, restated: bins (lo, hi], per-bin |accuracy - confidence| weighted by the bin's share."""
    edges = [i / n_bins for i in range(n_bins + 1)]
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        members = [i for i, c in enumerate(confidences) if lo < c <= hi]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidences[i] for i in members) / len(members)
            total += abs(acc - conf) * len(members) / len(confidences)
    return total


def test_ece_pinned_for_15_and_20_bins():
    """Confidences 0.64 (right) and 0.66 (wrong) share a bin of width 1/15 but not of width 1/20."""
    probs = torch.tensor(
        [[0.64, 0.36, 0.0], [0.34, 0.66, 0.0], [0.93, 0.07, 0.0], [0.03, 0.97, 0.0]], dtype=torch.float64
    )
    labels = torch.tensor([0, 0, 0, 0])
    assert expected_calibration_error(probs, labels, 20) == pytest.approx((0.36 + 0.66 + 0.07 + 0.97) / 4, abs=1e-12)
    assert expected_calibration_error(probs, labels, 15) == pytest.approx((0.30 + 0.07 + 0.97) / 4, abs=1e-12)
    assert ECE_BINS == 15 and TTA_ECE_BINS == 20
    generator = torch.Generator().manual_seed(0)
    probs = (torch.randn(500, 10, generator=generator, dtype=torch.float64) * 2).softmax(1)
    labels = torch.randint(0, 10, (500,), generator=generator)
    confidence, prediction = probs.max(1)
    expected = _ctpt_reference_ece(confidence.tolist(), (prediction == labels).tolist(), 20)
    assert expected_calibration_error(probs, labels, 20) == pytest.approx(expected, abs=1e-12)
