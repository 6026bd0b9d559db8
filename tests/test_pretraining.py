"""Contrastive pre-training through the shared engine: the two losses against hand computations, caption files and
shards read lazily (and their errors), the objective as a method (trimmed text rows, open_clip's decay rule), runs
that lower the loss, reload with the same features, resume exactly after a kill and train the same model on 2 gloo
processes as on 1, the world's zero-shot sets, and the command line."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptkd.backbones import load_backbone
from promptkd.data.captions import CaptionCorpus, CaptionDataset, CaptionViews, resolve_caption_file
from promptkd.data.items import DataError
from promptkd.engine.data import SeededDataset
from promptkd.errors import PromptKDError
from promptkd.methods.base import Batch
from promptkd.methods.contrastive import ContrastivePretraining, encode_text, trimmed_tokens
from promptkd.pretraining import MAX_LOGIT_SCALE, clamp_logit_scale_, clip_loss, itl_loss, same_label_targets
from promptkd.pretraining.run import CURVE_NAME, HISTORY_NAME, resolve_pretrain_config, run_pretraining
from promptkd.pretraining.world_eval import WorldZeroShot, ZeroShotSet, world_zero_shot_sets


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


def test_clip_loss_is_open_clips_loss():
    """The same objective as open_clip's trainer, so the two can be swapped (README: pre-training at scale)."""
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(math.log(20.0))
    expected = ClipLoss()(image, text, scale.exp())
    assert clip_loss(image, text, scale).item() == pytest.approx(expected.item(), abs=1e-6)


def test_logit_scale_is_clamped_at_ln_100_as_a_parameter():
    holder = torch.nn.Module()
    holder.logit_scale = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(holder)
    assert holder.logit_scale.item() == pytest.approx(math.log(100))
    # The gradient reaches the parameter below the clamp (it is learnt).
    scale = torch.tensor(1.0, requires_grad=True)
    clip_loss(IMAGES, TEXTS, scale).backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


def test_logit_scale_at_the_cap_gets_open_clips_gradient():
    """open_clip clamps the parameter after the step and feeds ``ClipLoss`` exp(logit_scale): at the cap the
    parameter keeps its true gradient (a clamp inside the loss passed it exactly 0)."""
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    ours, theirs = torch.nn.Module(), torch.nn.Module()
    for holder in (ours, theirs):
        holder.logit_scale = torch.nn.Parameter(torch.tensor(9.0))
        clamp_logit_scale_(holder)  # open_clip: logit_scale.clamp_(0, math.log(100)) after every step
    loss = clip_loss(image, text, ours.logit_scale)
    expected = ClipLoss()(image, text, theirs.logit_scale.exp())
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert ours.logit_scale.grad.item() == pytest.approx(theirs.logit_scale.grad.item(), rel=1e-5, abs=1e-7)
    assert ours.logit_scale.grad.abs().item() > 1e-4
    # The loss uses the scale it is given, as ClipLoss does (the cap lives on the parameter).
    assert clip_loss(image, text, 5.0).item() == pytest.approx(ClipLoss()(image, text, math.exp(5.0)).item(), rel=1e-6)


def test_itl_gives_every_unlabelled_caption_its_own_class():
    """UniCL: a pair without a class label (-1) is a class of its own, never a positive of another unlabelled one."""
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    assert same_label_targets(torch.tensor([-1, -1, -1])).tolist() == torch.eye(3).tolist()
    unlabelled = torch.full((6,), -1)
    assert itl_loss(u, v, unlabelled, scale).item() == pytest.approx(clip_loss(u, v, scale).item(), abs=1e-6)
    mixed = torch.tensor([0, -1, 0, -1, 2, -1])
    distinct = torch.tensor([0, 10, 0, 11, 2, 12])  # the same batch with the unlabelled pairs numbered apart
    assert torch.equal(same_label_targets(mixed), same_label_targets(distinct))
    assert itl_loss(u, v, mixed, scale).item() == pytest.approx(itl_loss(u, v, distinct, scale).item(), abs=1e-6)


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


def _views(backbone, **kw) -> CaptionViews:
    return CaptionViews(backbone.image_size, backbone.preprocess.mean, backbone.preprocess.std, **kw)


def test_jsonl_corpus_is_indexed_not_decoded(corpus):
    c = CaptionCorpus.from_file(resolve_caption_file(corpus.parent))  # a folder holding captions.jsonl
    assert len(c) == 32 and c.classnames == list(COLOURS) and c.labels == [k for k in range(4) for _ in range(8)]
    assert c.captions[0] == ["a photo of a red square."] and c.paths[0].endswith("images/red/0.png")
    assert c.has_labels and c.summary()["classes"] == 4


def test_caption_samples_are_views_labels_and_tokens_drawn_by_the_seeded_generator(tiny_backbone, corpus):
    c = CaptionCorpus.from_file(corpus)
    views = _views(tiny_backbone, translate=0.1, zoom=(0.6, 1.0), noise=4.0)
    data = SeededDataset(CaptionDataset(c, views, tiny_backbone.tokenize), seed=3)
    image, label, index, key, tokens = data[9]
    assert image.shape == (3, 32, 32) and label == 1 and index == 9 and key is None
    assert torch.equal(tokens, tiny_backbone.tokenize(["a green square."])[0])
    again = data[9]
    assert torch.equal(image, again[0])  # same (seed, epoch, index): the same view
    data.epoch = 1
    assert not torch.equal(image, data[9][0])  # another epoch: another view
    plain = CaptionDataset(c, _views(tiny_backbone, hflip=False), tiny_backbone.tokenize)[0][0]
    mean = torch.tensor(tiny_backbone.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(tiny_backbone.preprocess.std).view(3, 1, 1)
    pixels = torch.from_numpy(np.asarray(Image.open(c.paths[0]).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.allclose(plain, (pixels / 255.0 - mean) / std, atol=1e-6)  # no augmentation: the image itself


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
    c = CaptionCorpus.from_file(tmp_path / "captions_coco.json")
    assert len(c) == 3 and c.captions[0] == ["caption 0", "caption 3"]
    assert c.classnames == ["blue square"] and c.has_labels


def test_missing_image_names_file_and_line(tmp_path):
    path = _write_corpus(tmp_path, per_class=1, extra=json.dumps({"image": "red/missing.png", "caption": "a red"}))
    with pytest.raises(DataError, match=r"captions\.jsonl:3: 1 of 5 listed images do not exist") as info:
        CaptionCorpus.from_file(path)
    assert "missing.png" in str(info.value)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = _write_corpus(tmp_path, per_class=1, extra='{"image": "red/0.png", "caption": ')
    with pytest.raises(DataError, match=r"captions\.jsonl:3: not valid JSON"):
        CaptionCorpus.from_file(path)
    path.write_text(json.dumps({"image": "red/0.png"}) + "\n")
    with pytest.raises(DataError, match=r"captions\.jsonl:1: no \"caption\""):
        CaptionCorpus.from_file(path)


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, tiny_backbone):
    path = _write_corpus(tmp_path, per_class=2)
    (tmp_path / "images" / "red" / "1.png").write_bytes(b"not a png")
    c = CaptionCorpus.from_file(path)
    with pytest.raises(DataError, match=r"red/1\.png"):
        CaptionDataset(c, _views(tiny_backbone), tiny_backbone.tokenize)[1]
    skipping = CaptionDataset(c, _views(tiny_backbone), tiny_backbone.tokenize, skip_bad=True)
    _, label, tokens = skipping[1]
    assert label == 1 and skipping.skipped == [str(tmp_path / "images" / "red" / "1.png")]
    # the next readable image (green/0) stands in, with its own caption
    assert torch.equal(tokens, tiny_backbone.tokenize(["a photo of a green square."])[0])


# ----------------------------------------------------------------------------------------------------------------------
# The objective as a method
# ----------------------------------------------------------------------------------------------------------------------


def test_trimmed_text_rows_give_the_models_own_features(tiny_backbone):
    captions = ["a photo of a red square.", "a blue square.", "a yellow square on a dark background."]
    full = tiny_backbone.tokenize(captions)
    rows = trimmed_tokens(tiny_backbone.model, full)
    assert rows.shape[1] < tiny_backbone.context_length  # padding columns cut off
    with torch.no_grad():
        expected = tiny_backbone.model.encode_text(full, normalize=True)
        assert torch.allclose(encode_text(tiny_backbone.model, rows), expected, atol=1e-5)


def test_every_weight_trains_with_open_clips_decay_rule():
    torch.manual_seed(0)
    method = ContrastivePretraining(load_backbone("pkd-tiny"), ["a", "b"])
    params = dict(method.clip.named_parameters())
    assert method.trainable_parameters() and all(p.requires_grad for p in params.values())
    no_decay, decay = method.param_groups(0.1)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    exempt = {id(p) for p in no_decay["params"]}
    assert id(params["logit_scale"]) in exempt and all(p.ndim >= 2 for p in decay["params"])
    assert len(exempt) + len(decay["params"]) == len(params)
    assert set(method.trainable_state()) == set(params)  # the checkpoint holds the whole CLIP


def test_itl_needs_labels_and_the_scale_is_clamped_before_each_step(tiny_backbone):
    torch.manual_seed(0)
    method = ContrastivePretraining(load_backbone("pkd-tiny"), [])
    tokens = method.backbone.tokenize(["a", "b"])
    batch = Batch(torch.randn(2, 3, 32, 32), torch.tensor([-1, -1]), texts=tokens)
    with pytest.raises(PromptKDError, match="needs a class label"):
        method.training_step(batch)
    with torch.no_grad():
        method.clip.logit_scale.fill_(9.0)
    method.training_step(Batch(batch.images, torch.tensor([0, 1]), texts=tokens)).loss.backward()
    assert method.clip.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    with pytest.raises(PromptKDError, match="captioned images"):
        method.training_step(Batch(batch.images, torch.tensor([0, 1])))


# ----------------------------------------------------------------------------------------------------------------------
# Runs through the engine
# ----------------------------------------------------------------------------------------------------------------------


def _run(out, data, *sets: str, **base):
    settings = ["train.batch_size=8", "train.epochs=3", "train.progress=false", "train.log_every=1", *sets]
    config = resolve_pretrain_config(None, settings, {"data": str(data), "model": "pkd-tiny", "out": str(out), **base})
    return run_pretraining(config)


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "open_clip_model.safetensors"))


def test_a_run_lowers_the_loss_and_writes_a_model_that_reloads(corpus, tmp_path):
    out = tmp_path / "model"
    history = _run(out, corpus, "method.translate=0.1", "method.zoom=[0.6,1.0]", "method.noise=4.0").history
    losses = [r["loss"] for r in history["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0] and history["steps"] == 12 and history["init"] == "random"
    assert history["data"]["images"] == 32 and history["images_per_second"] > 0
    for name in ("config.yaml", "train.log", "metrics.jsonl", "epochs.jsonl", HISTORY_NAME):
        assert (out / name).is_file(), name
    assert (out / CURVE_NAME).stat().st_size > 1000
    assert not (out / "prompts.safetensors").exists()  # the model is the checkpoint, written once

    reloaded = load_backbone(f"local-dir:{out}")
    state = _weights(out)
    assert all(torch.equal(state[k], v) for k, v in reloaded.model.state_dict().items())
    assert reloaded.model.logit_scale.item() <= MAX_LOGIT_SCALE + 1e-6
    with pytest.raises(PromptKDError, match="already holds a pre-trained model"):
        _run(out, corpus)


def test_a_local_dir_model_is_recorded_as_starting_from_its_folders_weights(corpus, tmp_path, tiny_backbone, caplog):
    import logging

    from promptkd.backbones.export import save_local_dir

    folder = save_local_dir(tiny_backbone, tmp_path / "start")
    caplog.set_level(logging.INFO, logger="promptkd")
    history = _run(tmp_path / "run", corpus, "train.epochs=1", model=f"local-dir:{folder}").history
    assert history["init"] == f"local-dir:{folder}"
    log = caplog.text
    assert "random weights" not in log and f"starts from the weights of local-dir:{folder}" in log
    with pytest.raises(PromptKDError, match="a local-dir folder carries its own weights"):
        _run(tmp_path / "other", corpus, model=f"local-dir:{folder}", pretrained="openai")


def test_same_seed_gives_identical_weights_and_another_seed_does_not(corpus, tmp_path):
    runs = [
        _run(tmp_path / f"s{k}", corpus, f"train.seed={seed}", "method.objective=clip")
        for k, seed in enumerate((0, 0, 1))
    ]
    a, b, c = (_weights(r.out) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _caption_shards(folder, n_shards=4, per_shard=8, missing_caption=None, corrupt=None) -> str:
    """WebDataset shards of the toy corpus: <key>.png + <key>.txt (+ <key>.cls), in key order; the sample
    ``corrupt`` (shard, index) has bytes that are no image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        with tarfile.open(folder / f"caps-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                label = (s * per_shard + i) % len(COLOURS)
                colour = list(COLOURS)[label]
                buffer = io.BytesIO()
                _image(colour, rng).save(buffer, "PNG")
                image = b"not an image" if (s, i) == corrupt else buffer.getvalue()
                members = [("cls", str(label).encode()), ("png", image)]
                if (s, i) != missing_caption:
                    members.append(("txt", f"a {colour} square.\na photo of a {colour} square.".encode()))
                for extension, payload in members:
                    info = tarfile.TarInfo(f"{s:03d}{i:04d}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / f"caps-{{000..{n_shards - 1:03d}}}.tar")


def test_shards_stream_captions_and_labels_through_the_engine(tmp_path, tiny_backbone):
    from promptkd.data.captions import shard_companion
    from promptkd.data.shards import ShardLanes
    from promptkd.engine.stream import StreamSource, stream_batches

    pattern = _caption_shards(tmp_path / "shards")
    lanes = ShardLanes(pattern, lanes=4, seed=0, companions=("txt", "cls"))
    source = StreamSource(lanes, transform=_views(tiny_backbone), companion=shard_companion(tiny_backbone.tokenize))
    batch = next(stream_batches(source, batch_size=8))
    assert batch.texts is not None and batch.texts.shape == (8, tiny_backbone.context_length)
    colours = list(COLOURS)
    for label, key, row in zip(batch.labels.tolist(), batch.keys, batch.texts):
        shard, index = int(key.split("/")[0][5:8]), int(key.split("/")[1][3:7])
        assert label == (shard * 8 + index) % 4
        options = [f"a {colours[label]} square.", f"a photo of a {colours[label]} square."]
        assert any(torch.equal(row, tiny_backbone.tokenize([o])[0]) for o in options)

    history = _run(tmp_path / "run", pattern, "train.epochs=2").history
    assert history["steps"] == 8 and history["data"]["images"] == 32 and history["epochs"][-1]["loss"] > 0


def test_a_sample_without_caption_is_named_or_skipped(tmp_path):
    pattern = _caption_shards(tmp_path / "shards", missing_caption=(1, 3))
    with pytest.raises(DataError, match=r"caps-001\.tar:0010003\.png.*no caption"):
        _run(tmp_path / "strict", pattern, "train.epochs=1")
    history = _run(tmp_path / "skip", pattern, "train.epochs=1", "skip_bad=true").history
    assert history["skipped_images"] == [f"{tmp_path / 'shards' / 'caps-001.tar'}:0010003.png"]


def test_bad_settings_are_refused_before_training(corpus, tmp_path):
    with pytest.raises(PromptKDError, match="batch size 64 exceeds the 32 images"):
        _run(tmp_path / "a", corpus, "train.batch_size=64")
    unlabelled = tmp_path / "plain" / "captions.jsonl"
    unlabelled.parent.mkdir()
    (unlabelled.parent / "images").symlink_to(corpus.parent / "images")
    unlabelled.write_text(json.dumps({"image": "red/0.png", "caption": "a red square."}) + "\n")
    with pytest.raises(PromptKDError, match="objective 'itl' needs a class label"):
        _run(tmp_path / "b", unlabelled)
    with pytest.raises(PromptKDError, match="pre-trains a whole CLIP"):
        from promptkd.engine.run import resolve_run_config

        resolve_run_config("contrastive", None, [], {})


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    argv = ["--model", "pkd-tiny", "--data", str(corpus), "--batch-size", "8", "--epochs", "6", "--log-every", "1"]
    argv += ["--checkpoint-every", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: the same float reductions
    reference = tmp_path / "full"
    command = [sys.executable, "-m", "promptkd.cli.main", "pretrain", *argv, "--out", str(reference)]
    subprocess.run(command, check=True, env=env)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "promptkd.cli.main", "pretrain", *argv, "--out", str(out)]
    process = subprocess.Popen(command, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() or (out / "metrics.jsonl").read_text().count("\n") < 6:
            assert process.poll() is None and time.time() < deadline, "pre-training subprocess ended early"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # in epoch 2 (4 steps an epoch)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / HISTORY_NAME).exists()
    subprocess.run(command, check=True, env=env)
    log = (out / "train.log").read_text()
    assert "resuming" in log
    expected, resumed = _weights(reference), _weights(out)
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key


def _ddp_worker(rank, world_size, port, out, data, *sets):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        _run(out, data, "train.epochs=2", *sets, device="cpu")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["file", "shards", "shards with a corrupt member"])
def test_two_gloo_processes_train_the_same_model_as_one(corpus, tmp_path, source):
    """With --skip-bad a corrupt member leaves one process a batch row short: features are gathered padded, so the
    global batch is the readable samples on 2 processes as on 1 (unequal rows used to break all_gather)."""
    import torch.multiprocessing as mp

    from test_engine import _free_port

    corrupt = (1, 3) if "corrupt" in source else None  # lane 1: read by rank 1 only
    data = str(corpus) if source == "file" else _caption_shards(tmp_path / "shards", corrupt=corrupt)
    sets = ["skip_bad=true"] if corrupt else []
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), data, *sets), nprocs=2, join=True)
    single = _run(tmp_path / "single", data, "train.epochs=2", *sets).history
    one, two = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert (tmp_path / "ddp" / "epochs.jsonl").read_text().count("\n") == 2
    recorded = json.loads((tmp_path / "ddp" / HISTORY_NAME).read_text())["skipped_images"]
    assert (
        recorded
        == single["skipped_images"]
        == ([f"{tmp_path / 'shards' / 'caps-001.tar'}:0010003.png"] * 2 if corrupt else [])
    )
    for key, value in one.items():
        assert torch.allclose(two[key], value, atol=2e-5), key


# ----------------------------------------------------------------------------------------------------------------------
# World zero-shot sets
# ----------------------------------------------------------------------------------------------------------------------


def test_world_zero_shot_sets_are_deterministic_and_cover_held_out_classes(tiny_backbone):
    from promptkd.data.world import FAMILIES

    a = world_zero_shot_sets(32, per_class=1, styles=("clean",))
    b = world_zero_shot_sets(32, per_class=1, styles=("clean",))
    assert [s.name for s in a] == [f"{f}_clean" for f in FAMILIES]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    shapes = a[0]
    assert len(shapes.prompts) == 64 and shapes.prompts[0] == "a photo of a red circle."
    assert len(shapes.metrics["held_out"][0]) == len(FAMILIES["shapes"].held_out)
    metrics = WorldZeroShot(a)(tiny_backbone)
    assert {"clean/seen", "clean/held_out", "clean/held_out_only", "shapes_clean/held_out"} <= set(metrics)
    assert all(0 <= v <= 100 for v in metrics.values())


def test_zero_shot_uses_the_models_own_towers(tiny_backbone, corpus):
    c = CaptionCorpus.from_file(corpus)
    images = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1) for p in c.paths]
    )
    prompts = [f"a photo of a {name} square." for name in c.classnames]
    labels = torch.tensor(c.labels)
    metrics = WorldZeroShot([ZeroShotSet("toy_clean", images, labels, prompts)])(tiny_backbone)
    mean = torch.tensor(tiny_backbone.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_backbone.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        f = tiny_backbone.model.encode_image((images / 255.0 - mean) / std, normalize=True)
        t = tiny_backbone.model.encode_text(tiny_backbone.tokenize(prompts), normalize=True)
    expected = 100.0 * ((f @ t.T).argmax(1) == labels).float().mean().item()
    assert metrics["toy_clean/acc"] == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_run_summary_refusals_and_exit_codes(corpus, tmp_path, capsys):
    from promptkd.cli.main import main

    out = tmp_path / "cli-model"
    argv = ["pretrain", "--model", "pkd-tiny", "--data", str(corpus), "--epochs", "1", "--batch-size", "8"]
    argv += ["--out", str(out), "--objective", "clip", "--no-progress", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["init"] == "random" and (out / "open_clip_config.json").is_file()
    assert main(argv) == 2 and "already holds a pre-trained model" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main([*argv[:4], str(tmp_path / "nothing"), *argv[5:], "--overwrite"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_shipped_weights_records_say_what_made_them_and_what_remakes_them_now():
    """The records named a schedule (onecycle, 2,400 steps) that no command runs any more: what made the weights (the
    loop before the engine) and what remakes them now (the world preset through the engine) are told apart."""
    from promptkd.backbones import load_backbone
    from promptkd.backbones.weights import WEIGHTS_DIR, shipped_record

    preset = resolve_pretrain_config("world", [], {"data": "world"})
    for model in ("pkd-world-teacher", "pkd-world-student"):
        pretrain = shipped_record(WEIGHTS_DIR / f"{model}.safetensors")["pretrain"]
        made_by = pretrain["made_by"]
        assert "c8e27db" in made_by["script"] and (made_by["schedule"], made_by["steps"]) == ("onecycle", 2400)
        assert "schedule" not in pretrain and "steps" not in pretrain  # nothing claimed of the current command
        assert pretrain["command"] == "python scripts/pretrain_world.py" and pretrain["preset"] == "world"
        steps = 11040 // preset.train.batch_size * preset.train.epochs  # the world corpus: 11,040 captioned images
        assert f"{preset.train.epochs} epochs = {steps:,} steps of {preset.train.batch_size}" in pretrain["remake"]
        assert f"lr {preset.train.lr:g}" in pretrain["remake"] and preset.method_config["objective"] == "itl"
        for key in ("batch_size", "lr", "weight_decay", "grad_clip", "seed"):  # the recipe both share
            assert made_by[key] == getattr(preset.train, key), (model, key)
        assert load_backbone(model, "shipped").spec.pretrained == "shipped"  # the weight files' hashes still hold
