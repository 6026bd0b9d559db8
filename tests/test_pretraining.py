"""Contrastive pre-training: the two losses against hand computations, the in-memory caption data and its errors,
the training loop (loss goes down, same seed = same weights) and the saved folder reloading with the same features."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from promptkd.backbones import load_backbone
from promptkd.data.items import DataError
from promptkd.pretraining import (
    CURVE_NAME,
    HISTORY_NAME,
    MAX_LOGIT_SCALE,
    CaptionDataset,
    PretrainConfig,
    ZeroShotEvaluator,
    ZeroShotSet,
    clamp_logit_scale_,
    clip_loss,
    itl_loss,
    load_caption_dataset,
    pretrain,
    same_label_targets,
    world_zero_shot_sets,
)
from promptkd.pretraining.train import _tokenize_all, encode_text


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models this small gain nothing from a second thread, and one thread is not slowed by a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------------

# Unit vectors at angles 0, 90 and 45 degrees: the dot products are 1, 0 and 1/sqrt(2).
_R = 1 / math.sqrt(2)
IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [_R, _R]])
TEXTS = torch.tensor([[1.0, 0.0], [_R, _R], [0.0, 1.0]])


def _log_softmax(row: list[float], k: int) -> float:
    return row[k] - math.log(sum(math.exp(v) for v in row))


def _sims(scale: float) -> list[list[float]]:
    return [[scale * sum(a * b for a, b in zip(u, v)) for v in TEXTS.tolist()] for u in IMAGES.tolist()]


def test_clip_loss_matches_hand_computation():
    scale = 2.0
    s = _sims(scale)
    cols = [[s[i][j] for i in range(3)] for j in range(3)]
    i2t = -sum(_log_softmax(s[i], i) for i in range(3)) / 3
    t2i = -sum(_log_softmax(cols[j], j) for j in range(3)) / 3
    loss = clip_loss(IMAGES, TEXTS, torch.tensor(math.log(scale)))
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), abs=1e-6)
    # Features are normalised inside: scaling them changes nothing.
    assert clip_loss(3 * IMAGES, 0.5 * TEXTS, math.log(scale)).item() == pytest.approx(loss.item(), abs=1e-6)


def test_itl_loss_matches_hand_computation():
    scale, labels = 3.0, [0, 0, 1]
    s = _sims(scale)
    cols = [[s[i][j] for i in range(3)] for j in range(3)]
    positives = [[k for k in range(3) if labels[k] == labels[i]] for i in range(3)]
    i2t = -sum(sum(_log_softmax(s[i], k) for k in positives[i]) / len(positives[i]) for i in range(3)) / 3
    t2i = -sum(sum(_log_softmax(cols[j], k) for k in positives[j]) / len(positives[j]) for j in range(3)) / 3
    loss = itl_loss(IMAGES, TEXTS, torch.tensor(labels), torch.tensor(math.log(scale)))
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), abs=1e-6)
    assert same_label_targets(torch.tensor(labels)).tolist() == [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]


def test_itl_equals_clip_when_all_labels_differ():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    labels = torch.tensor([7, 3, 0, 1, 2, 9, 4, 5])
    scale = torch.tensor(math.log(1 / 0.07))
    assert itl_loss(u, v, labels, scale).item() == pytest.approx(clip_loss(u, v, scale).item(), abs=1e-6)
    # One shared label makes a difference.
    labels[1] = 7
    assert itl_loss(u, v, labels, scale).item() != pytest.approx(clip_loss(u, v, scale).item(), abs=1e-4)


def test_logit_scale_is_clamped_at_ln_100():
    assert clip_loss(IMAGES, TEXTS, 10.0).item() == pytest.approx(clip_loss(IMAGES, TEXTS, MAX_LOGIT_SCALE).item())
    holder = torch.nn.Module()
    holder.logit_scale = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(holder)
    assert holder.logit_scale.item() == pytest.approx(math.log(100))
    # The gradient reaches the parameter below the clamp (it is learnt).
    scale = torch.tensor(1.0, requires_grad=True)
    clip_loss(IMAGES, TEXTS, scale).backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225), "yellow": (240, 215, 40)}


def _image(colour: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    pixels = np.full((size, size, 3), 20, np.float32)
    x, y = rng.integers(4, size - 14, 2)
    pixels[y : y + 12, x : x + 12] = COLOURS[colour]
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_corpus(folder, per_class: int = 8, extra: str | None = None):
    """A tiny world-layout corpus: folder/images/<class>/<n>.png and folder/captions.jsonl."""
    rng = np.random.default_rng(0)
    lines = []
    for label, colour in enumerate(COLOURS):
        (folder / "images" / colour).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            rel = f"{colour}/{n}.png"
            _image(colour, rng).save(folder / "images" / rel)
            caption = ("a photo of a {} square.", "a {} square.")[n % 2].format(colour)
            lines.append(json.dumps({"image": rel, "caption": caption, "label": label, "classname": colour}))
    if extra is not None:
        lines.insert(2, extra)
    path = folder / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def test_jsonl_corpus_loads_into_memory(corpus):
    ds = load_caption_dataset(corpus.parent, 32)  # a folder holding captions.jsonl
    assert ds.images.shape == (32, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.classnames == list(COLOURS) and ds.labels.tolist() == [k for k in range(4) for _ in range(8)]
    assert ds.captions[0] == ["a photo of a red square."]
    small = CaptionDataset.from_file(corpus, 16)  # resized on load
    assert small.images.shape == (32, 3, 16, 16)


def test_coco_captions_merge_captions_per_image(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(1)
    for k in range(3):
        _image("blue", rng).save(tmp_path / "images" / f"{k}.png")
    coco = {
        "images": [{"id": k, "file_name": f"{k}.png", "classname": "blue square"} for k in range(3)],
        "annotations": [{"id": j, "image_id": j % 3, "caption": f"caption {j}"} for j in range(6)],
    }
    (tmp_path / "captions_coco.json").write_text(json.dumps(coco))
    ds = load_caption_dataset(tmp_path / "captions_coco.json", 32)
    assert len(ds) == 3 and ds.captions[0] == ["caption 0", "caption 3"]
    assert ds.classnames == ["blue square"] and ds.has_labels


def test_missing_image_names_file_and_line(tmp_path):
    path = _write_corpus(tmp_path, per_class=1, extra=json.dumps({"image": "red/missing.png", "caption": "a red"}))
    with pytest.raises(DataError, match=r"captions\.jsonl:3: 1 of 5 listed images do not exist") as info:
        load_caption_dataset(path, 32)
    assert "missing.png" in str(info.value)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = _write_corpus(tmp_path, per_class=1, extra='{"image": "red/0.png", "caption": ')
    with pytest.raises(DataError, match=r"captions\.jsonl:3: not valid JSON"):
        load_caption_dataset(path, 32)
    path.write_text(json.dumps({"image": "red/0.png"}) + "\n")
    with pytest.raises(DataError, match=r"captions\.jsonl:1: no \"caption\""):
        load_caption_dataset(path, 32)


def test_itl_needs_labels(tiny_backbone):
    ds = CaptionDataset.from_images([np.zeros((32, 32, 3), np.uint8)] * 4, ["a", "b", "c", "d"])
    with pytest.raises(DataError, match="needs a class label"):
        pretrain(tiny_backbone, ds, PretrainConfig(objective="itl", steps=1, batch_size=2, progress=False))


def test_trimmed_text_rows_give_the_models_own_features(tiny_backbone, corpus):
    ds = load_caption_dataset(corpus, 32)
    rows = _tokenize_all(tiny_backbone, ds)
    assert rows.shape[1] < tiny_backbone.context_length  # padding columns cut off
    full = tiny_backbone.tokenize([c for caps in ds.captions for c in caps])
    with torch.no_grad():
        expected = tiny_backbone.model.encode_text(full, normalize=True)
        assert torch.allclose(encode_text(tiny_backbone.model, rows), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def _fresh(seed: int = 0):
    torch.manual_seed(seed)
    return load_backbone("pkd-tiny")


def _config(**kw) -> PretrainConfig:
    base = {"steps": 12, "batch_size": 16, "lr": 2e-3, "log_every": 3, "eval_every": 6, "progress": False}
    return PretrainConfig(**{**base, **kw})


def _evaluator(ds: CaptionDataset) -> ZeroShotEvaluator:
    prompts = [f"a photo of a {c} square." for c in ds.classnames]
    return ZeroShotEvaluator([ZeroShotSet("toy_clean", ds.images, ds.labels, prompts)])


def test_a_few_steps_lower_the_loss_and_everything_is_saved(corpus, tmp_path):
    ds = load_caption_dataset(corpus, 32)
    backbone = _fresh()
    out = tmp_path / "model"
    config = _config(translate=0.1, zoom=(0.6, 1.0), noise=4.0)
    history = pretrain(backbone, ds, config, evaluate=_evaluator(ds), out_dir=out)
    losses = [r["loss"] for r in history.train]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert [r["step"] for r in history.eval] == [6, 12] and 0 <= history.eval[-1]["toy_clean/acc"] <= 100
    assert not backbone.model.training and history.seconds_per_step > 0

    saved = json.loads((out / HISTORY_NAME).read_text())
    assert saved["config"]["steps"] == 12 and saved["train"] == history.train and saved["eval"] == history.eval
    assert (out / CURVE_NAME).stat().st_size > 1000

    reloaded = load_backbone(f"local-dir:{out}")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = backbone.tokenize(["a photo of a red square.", "a blue square."])
    with torch.no_grad():
        assert torch.allclose(backbone.model.encode_image(images), reloaded.model.encode_image(images), atol=1e-6)
        assert torch.allclose(backbone.model.encode_text(ids), reloaded.model.encode_text(ids), atol=1e-6)
        assert reloaded.model.logit_scale.item() == pytest.approx(backbone.model.logit_scale.item())


def test_same_seed_gives_identical_weights(corpus):
    ds = load_caption_dataset(corpus, 32)
    states = []
    for seed in (0, 0, 1):
        backbone = _fresh()
        pretrain(backbone, ds, _config(steps=3, batch_size=8, seed=seed, objective="clip", schedule="cosine"))
        states.append(backbone.model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # the seed matters


def test_world_zero_shot_sets_are_deterministic_and_cover_held_out_classes(tiny_backbone):
    from promptkd.data.world import FAMILIES

    a = world_zero_shot_sets(32, per_class=1, styles=("clean",))
    b = world_zero_shot_sets(32, per_class=1, styles=("clean",))
    assert [s.name for s in a] == [f"{f}_clean" for f in FAMILIES]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    shapes = a[0]
    assert len(shapes.prompts) == 64 and shapes.prompts[0] == "a photo of a red circle."
    assert len(shapes.metrics["held_out"][0]) == len(FAMILIES["shapes"].held_out)
    metrics = ZeroShotEvaluator(a)(tiny_backbone)
    assert {"clean/seen", "clean/held_out", "clean/held_out_only", "shapes_clean/held_out"} <= set(metrics)
    assert all(0 <= v <= 100 for v in metrics.values())


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_defaults_match_the_config_and_a_run_writes_a_model(corpus, tmp_path, capsys):
    from promptkd.cli import pretrain as command

    defaults = PretrainConfig()
    assert {k: getattr(defaults, k) for k in command.HELP_DEFAULTS} == command.HELP_DEFAULTS
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "cli-model"
    argv = [
        "--model",
        "pkd-tiny",
        "--data",
        str(corpus),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--objective",
        "clip",
        "--no-progress",
        "--json",
    ]
    assert command.run(parser.parse_args(argv)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and (out / "open_clip_config.json").is_file()

    from promptkd.errors import PromptKDError

    with pytest.raises(PromptKDError, match="already holds a model"):
        command.run(parser.parse_args(argv))
    with pytest.raises(PromptKDError, match="batch_size"):
        command.run(parser.parse_args([*argv, "--overwrite", "--batch-size", "1"]))
