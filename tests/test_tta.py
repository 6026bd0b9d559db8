"""Test-time prompt tuning: batched == one at a time, order independence, hand-checked losses, source-file checks."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from promptkd.tta import TTAConfig, build_model, compute_prototypes, compute_stats, get_tta_method
from promptkd.tta.base import TTAError
from promptkd.tta.losses import (
    amplitude_angle_alignment,
    confident_views,
    marginal_entropy,
    prototype_discrimination,
    text_feature_dispersion,
    token_statistics,
    token_statistics_alignment,
)
from promptkd.tta.sources import Prototypes, SourceError, SourceStats
from promptkd.tta.views import TTAViewDataset, ViewConfig, check_image_sizes

CLASSES = ["red circle", "blue square", "green star", "yellow cross", "purple ring"]


def _toy_dataset(root: Path, per_class: int = 3, size: int = 40) -> Path:
    """A split-file dataset: coloured images, `per_class` train and test images per class."""
    folder = root / "toyset"
    rng = random.Random(0)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        for which in ("train", "val", "test"):
            for j in range(per_class if which != "val" else 1):
                rel = f"{label}/{which}_{j}.png"
                path = folder / "images" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                base = [(label * 53 + 40 * c) % 256 for c in range(3)]
                img = Image.new("RGB", (size, size), tuple(base))
                for _ in range(30):
                    x, y = rng.randrange(size), rng.randrange(size)
                    img.putpixel((x, y), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
                img.save(path)
                split[which].append([rel, label, name])
    (folder / "split_zhou_Toy.json").write_text(json.dumps(split))
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return _toy_dataset(tmp_path_factory.mktemp("tta"))


@pytest.fixture(scope="module")
def maple_ckpt(tiny_backbone, tmp_path_factory) -> Path:
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    torch.manual_seed(3)
    cls = get_method("maple")
    method = cls(tiny_backbone, CLASSES, config_from(cls, {"n_ctx": 2, "depth": 2}))
    with torch.no_grad():  # non-trivial coupling maps, so vision prompts depend on the text prompts
        for layer in method.learner.coupling.layers:
            layer.weight.normal_(0, 0.05)
    return method.save(tmp_path_factory.mktemp("maple") / "maple")


def _views(backbone, batch: int = 3, n_views: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_views, 3, backbone.image_size, backbone.image_size, generator=generator)


def _assert_same(batched, singles, lr: float) -> None:
    for i, single in enumerate(singles):
        assert torch.equal(single.logits[0].argmax(), batched.logits[i].argmax())
        torch.testing.assert_close(single.logits[0], batched.logits[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(single.selected[0], batched.selected[i])
        for key in single.params:
            # AdamW's first step is lr·g/(|g|+eps), a sign step: an element whose gradient is float noise (|g| ~ 1e-9)
            # can step either way in a batch of another size. Such elements must be rare and bounded by a few steps.
            diff = (single.params[key][0] - batched.params[key][i]).abs()
            assert float((diff > 1e-3 * lr).float().mean()) <= 0.01, key
            assert float(diff.max()) <= 4 * lr, key
            assert float(diff.mean()) <= 1e-3 * lr + 1e-7, key


# --- losses against hand computations ---------------------------------------------------------------------------


def test_marginal_entropy_and_selection_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    probs = logits.softmax(-1)[0]
    mean = probs.mean(0)
    expected = -(mean * mean.log()).sum()
    torch.testing.assert_close(marginal_entropy(logits)[0], expected)
    entropies = [-(p * p.log()).sum() for p in probs]
    order = sorted(range(4), key=lambda i: float(entropies[i]))
    assert confident_views(logits, 0.5)[0].tolist() == order[:2]
    assert confident_views(logits, 0.01).shape == (1, 1)  # at least one view


def test_text_dispersion_by_hand():
    t = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]]), dim=-1)
    centroid = t[0].mean(0)
    expected = sum(float((t[0, c] - centroid).norm()) for c in range(3)) / 3
    assert math.isclose(float(text_feature_dispersion(t)[0]), expected, rel_tol=1e-6)


def test_token_statistics_alignment_by_hand():
    tokens = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(6, 2, 2)  # 2 samples x 3 views
    means, variances = token_statistics(tokens, 3)
    torch.testing.assert_close(means[0], tokens[:3].mean(0))
    torch.testing.assert_close(variances[1], tokens[3:].var(0, unbiased=False))
    mu_s, var_s = torch.zeros(2, 2), torch.ones(2, 2)
    loss = token_statistics_alignment([means], [variances], [mu_s], [var_s])
    expected = (means[0] - mu_s).abs().mean() + (variances[0] - var_s).abs().mean()
    torch.testing.assert_close(loss[0], expected)


def test_prototype_discrimination_by_hand():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(1, 3, 4), dim=-1)
    views = F.normalize(torch.randn(3, 2, 4), dim=-1)
    tau = 0.5

    def s(a, b):
        return math.exp(float(a @ b) / tau)

    total = 0.0
    for k in range(3):
        pos = sum(s(text[0, k], views[k, a]) for a in range(2))
        neg = sum(s(text[0, k], text[0, m]) for m in range(3) if m != k)
        neg += sum(s(views[k, a], text[0, m]) for m in range(3) if m != k for a in range(2))
        neg += sum(s(text[0, k], views[m, a]) for m in range(3) if m != k for a in range(2))
        total += -math.log(pos / neg)
    assert math.isclose(float(prototype_discrimination(text, views, tau)[0]), total / 3, rel_tol=1e-5)


def test_amplitude_angle_alignment_by_hand():
    x = torch.tensor([[3.0, 4.0]])
    protos = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    weights = torch.tensor([[0.25, 0.75]])
    cos = 4.0 / 5.0
    expected = 0.25 * 0.0 + 0.75 * (math.log1p(abs(5 - 2) / 2) - math.log((1 + cos) / 2))
    assert math.isclose(float(amplitude_angle_alignment(x, protos, weights)[0]), expected, rel_tol=1e-5)


# --- batched adaptation == one image at a time -----------------------------------------------------------------


def test_tpt_batched_equals_single_and_is_batch_order_free(tiny_backbone):
    model, _ = build_model(CLASSES, backbone=tiny_backbone)
    method = get_tta_method("tpt")(model, TTAConfig(n_views=8, selection=0.25))
    views = _views(tiny_backbone, batch=4)
    batched = method.adapt(views)
    singles = [method.adapt(views[i : i + 1]) for i in range(4)]
    _assert_same(batched, singles, method.config.lr)
    assert float((batched.params["ctx"] - model.base["ctx"]).abs().max()) > 1e-3  # it did adapt
    permuted = method.adapt(views[[2, 0, 3, 1]])
    torch.testing.assert_close(permuted.logits, batched.logits[[2, 0, 3, 1]], atol=1e-4, rtol=1e-4)


def test_logit_scale_option_sets_the_scale_of_every_logit_the_tuner_computes(tiny_backbone):
    """``logit_scale`` (0: the model's own) rescales the loss and the logits: at CLIP's 100 the tiny model's
    predictions are sharper (lower entropy) and the tuned prompts move differently."""
    views = _views(tiny_backbone, batch=2)
    learned_model, _ = build_model(CLASSES, backbone=tiny_backbone)
    learned = get_tta_method("tpt")(learned_model, TTAConfig(n_views=8, selection=0.25)).adapt(views)
    scaled_model, _ = build_model(CLASSES, backbone=tiny_backbone)
    scaled = get_tta_method("tpt")(scaled_model, TTAConfig(n_views=8, selection=0.25, logit_scale=100.0)).adapt(views)
    assert scaled_model.logit_scale == 100.0 and learned_model.logit_scale == float(tiny_backbone.logit_scale)
    ratio = 100.0 / float(tiny_backbone.logit_scale)
    torch.testing.assert_close(scaled.initial_logits, learned.initial_logits * ratio, atol=1e-4, rtol=1e-4)
    assert float((scaled.params["ctx"] - learned.params["ctx"]).abs().max()) > 1e-6


def test_ctpt_batched_equals_single_with_chunked_text(tiny_backbone):
    model, _ = build_model(CLASSES, backbone=tiny_backbone)
    cls = get_tta_method("ctpt")
    method = cls(model, cls.config_class(n_views=8, steps=2, dispersion_weight=20.0))
    views = _views(tiny_backbone, batch=3, seed=1)
    whole = method.adapt(views)
    model.text_memory_mb = 1e-3  # one sequence per chunk: checkpointed chunks must give the same result
    try:
        chunked = method.adapt(views)
        singles = [method.adapt(views[i : i + 1]) for i in range(3)]
    finally:
        model.text_memory_mb = 1024.0
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-4, rtol=1e-4)
    _assert_same(whole, singles, method.config.lr)
    assert "atfd" in whole.losses


@pytest.fixture(scope="module")
def maple_sources(maple_ckpt, toy):
    from promptkd.data.datasets import resolve_dataset

    splits = resolve_dataset(str(toy), None)
    model, _ = build_model(splits.classnames, checkpoint=str(maple_ckpt))
    stats = compute_stats(model, splits.train, [0, 1], proxy="toy", progress=False)
    protos = compute_prototypes(
        model, splits.train, splits.classnames, n_augmented=2, views_per_class=4, proxy="toy", progress=False
    )
    return model, stats, protos


@pytest.mark.parametrize("name", ["promptalign", "promptsync"])
def test_multimodal_methods_batched_equal_single(name, maple_sources, tiny_backbone):
    model, stats, protos = maple_sources
    cls = get_tta_method(name)
    extra = {"align_layers": (0, 1)} if name == "promptalign" else {"steps": 2}
    method = cls(model, cls.config_class(n_views=8, selection=0.25, **extra), {"stats": stats, "prototypes": protos})
    views = _views(tiny_backbone, batch=3, seed=2)
    batched = method.adapt(views)
    singles = [method.adapt(views[i : i + 1]) for i in range(3)]
    _assert_same(batched, singles, method.config.lr)
    assert set(batched.params) == {"ctx", "deep", "coupling_weight", "coupling_bias"}
    assert float((batched.params["coupling_weight"] - model.base["coupling_weight"]).abs().max()) > 1e-4


def test_promptalign_loss_matches_manual_statistics(maple_sources, tiny_backbone):
    model, stats, _ = maple_sources
    cls = get_tta_method("promptalign")
    method = cls(model, cls.config_class(n_views=8, selection=0.5, align_layers=(0, 1)), {"stats": stats})
    from promptkd.tta.base import AdaptContext

    views = _views(tiny_backbone, batch=2, seed=4)
    ctx = AdaptContext(model, views, 0.5, method.tuned_keys())
    params = model.initial_params(2, method.tuned_keys())
    loss, parts = method.loss(params, ctx)
    captured = {}
    chosen = views[torch.arange(2).unsqueeze(1), ctx.selected].flatten(0, 1)
    model.encode_images(chosen, params, views_per_sample=ctx.k, block_hook=lambda i, x: captured.setdefault(i, x))
    expected = 0.0
    for layer in (0, 1):
        x = captured[layer].view(2, ctx.k, *captured[layer].shape[1:])
        mu_s, var_s = stats.layer(layer)
        expected = expected + (x.mean(1) - mu_s).abs().flatten(1).mean(1)
        expected = expected + (x.var(1, unbiased=False) - var_s).abs().flatten(1).mean(1)
    torch.testing.assert_close(parts["align"], expected / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, parts["entropy"] + method.config.align_weight * parts["align"])


# --- source files refuse what does not fit --------------------------------------------------------------------


def test_source_files_refuse_other_backbone_prompts_or_classes(maple_sources, wide_backbone, tmp_path):
    model, stats, protos = maple_sources
    stats.save(tmp_path / "stats")
    protos.save(tmp_path / "protos.safetensors")
    stats = SourceStats.load(tmp_path / "stats.safetensors")
    protos = Prototypes.load(tmp_path / "protos")
    stats.check(model, [0, 1])
    with pytest.raises(SourceError, match="no statistics for visual layers"):
        stats.check(model, [0, 3])
    other, _ = build_model(CLASSES, backbone=wide_backbone)
    with pytest.raises(SourceError, match="backbone"):
        stats.check(other, [0, 1])
    with pytest.raises(SourceError, match="backbone"):
        protos.check(other)
    plain, _ = build_model(model.classnames, backbone=model.backbone)  # same backbone, other prompts
    with pytest.raises(SourceError, match="other base prompts"):
        protos.check(plain)
    with pytest.raises(SourceError, match="no prototypes for 1 of the 2 test classes"):
        protos.rows(["red circle", "teal hexagon"])
    model.set_classnames(list(reversed(model.classnames)))
    try:
        method = get_tta_method("promptsync")(model, None, {"prototypes": protos})
        torch.testing.assert_close(method._visual[0], protos.visual[-1])  # rows follow the test class order
    finally:
        model.set_classnames(list(reversed(model.classnames)))
    with pytest.raises(TTAError, match="tta-stats"):
        get_tta_method("promptalign")(model, None, {})
    with pytest.raises(TTAError, match="MaPLe"):
        get_tta_method("promptalign")(plain, None, {"stats": stats})


def test_views_are_seeded_by_image_not_position_and_small_images_refused(toy, tiny_backbone, tmp_path):
    from promptkd.data.datasets import resolve_dataset
    from promptkd.data.items import DataError

    items = resolve_dataset(str(toy), None).test
    config = ViewConfig(n_views=4, seed=5)
    forward = TTAViewDataset(items, tiny_backbone.preprocess, config)
    backward = TTAViewDataset(list(reversed(items)), tiny_backbone.preprocess, config)
    torch.testing.assert_close(forward[0][0], backward[len(items) - 1][0])
    assert not torch.equal(forward[0][0][1], forward[0][0][2])  # augmented views differ from each other
    torch.testing.assert_close(forward[0][0][0], forward.base(Image.open(items[0].path).convert("RGB")))
    small = tmp_path / "small.png"
    Image.new("RGB", (4, 4)).save(small)
    from promptkd.data.items import Datum

    with pytest.raises(DataError, match="too small"):
        check_image_sizes([*items, Datum(str(small), 0, "x")], tiny_backbone.image_size, config)
    check_image_sizes([Datum(str(small), 0, "x")], tiny_backbone.image_size, ViewConfig(n_views=4, allow_small=True))


def test_run_is_order_independent_and_writes_results(toy, tiny_backbone, tmp_path, monkeypatch):
    """A shuffled test split gives the same per-image predictions (episodic reset, per-image view seeds)."""
    from promptkd.data import datasets as ds_module
    from promptkd.tta.run import resolve_tta_config, run_tta
    from tta_helpers import assert_same_predictions

    base = {
        "method": "tpt",
        "datasets": [str(toy)],
        "model": "pkd-tiny",
        "pretrained": "random",
        "batch_size": 2,
        "progress": False,
        "device": "cpu",
    }
    torch.manual_seed(0)
    first = run_tta(resolve_tta_config(None, ["method.n_views=6"], {**base, "out": str(tmp_path / "a")}))
    original = ds_module.resolve_dataset

    def shuffled(name, root, **kwargs):
        splits = original(name, root, **kwargs)
        random.Random(1).shuffle(splits.test)
        return splits

    monkeypatch.setattr(ds_module, "resolve_dataset", shuffled)
    torch.manual_seed(0)
    second = run_tta(resolve_tta_config(None, ["method.n_views=6"], {**base, "out": str(tmp_path / "b")}))
    a, b = first.results[0]["metrics"], second.results[0]["metrics"]
    assert a["acc1"] == b["acc1"] and math.isclose(a["ece"], b["ece"], abs_tol=1e-6)
    assert "base_acc1" in a and a["seconds_per_image"] > 0
    assert (tmp_path / "a" / "config.yaml").exists()
    assert list((tmp_path / "a").glob("tpt-*.json"))

    def rows(folder):
        import csv

        (path,) = (tmp_path / folder).glob("tpt-*-predictions.csv")
        header, *body = list(csv.reader(path.open()))
        return [header, *sorted(body)]

    assert len(rows("a")) == 1 + 3 * len(CLASSES)
    assert_same_predictions(rows("a"), rows("b"))


@pytest.mark.slow
def test_two_process_gloo_sharding_equals_one_process(toy, tmp_path):
    import csv
    import socket

    import torch.multiprocessing as mp

    from promptkd.tta.run import run_tta
    from tta_helpers import assert_same_predictions, tta_config, tta_ddp_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(tta_ddp_worker, args=(2, port, str(toy), str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.manual_seed(0)
    run_tta(tta_config(str(toy), str(tmp_path / "single")))

    def rows(folder):
        (path,) = (tmp_path / folder).glob("tpt-*-predictions.csv")
        return list(csv.reader(path.open()))

    assert_same_predictions(rows("ddp"), rows("single"))


def test_coop_checkpoint_is_a_tpt_base(tiny_backbone, tmp_path):
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    cls = get_method("coop")
    coop = cls(tiny_backbone, CLASSES[:3], config_from(cls, {"n_ctx": 4, "ctx_init": ""}))
    with torch.no_grad():
        coop.learner.text.ctx.normal_(0, 0.1)
    path = coop.save(tmp_path / "coop")
    model, description = build_model(CLASSES, checkpoint=str(path))  # another class list: context transfers
    assert "coop" in description and model.classnames == CLASSES
    torch.testing.assert_close(model.base["ctx"], coop.learner.text.ctx.detach())
    result = get_tta_method("tpt")(model, TTAConfig(n_views=4)).adapt(_views(tiny_backbone, batch=1, n_views=4))
    assert result.logits.shape == (1, len(CLASSES))


def test_cli_tta_stats_and_tta_with_clear_errors(toy, maple_ckpt, tmp_path, capsys):
    from promptkd.cli.main import main

    stats, protos = tmp_path / "stats", tmp_path / "protos"
    argv = ["tta-stats", "--dataset", str(toy), "--base", str(maple_ckpt), "--layers", "0", "1"]
    assert main([*argv, "--stats", str(stats), "--prototypes", str(protos), "--augmented", "1"]) == 0
    out = tmp_path / "run"
    common = ["--datasets", str(toy), "--base", str(maple_ckpt), "--no-progress", "--set", "method.n_views=4"]
    assert main(["tta", "--method", "promptsync", *common, "--prototypes", str(protos), "--out", str(out)]) == 0
    assert "promptsync toyset: acc" in capsys.readouterr().out
    # the same setting again: the earlier result is kept unless --overwrite
    assert main(["tta", "--method", "promptsync", *common, "--prototypes", str(protos), "--out", str(out)]) == 2
    assert "already holds a result" in capsys.readouterr().err
    # PromptAlign without its statistics, and prototypes from other prompts: refused before any adaptation
    assert main(["tta", "--method", "promptalign", *common, "--out", str(out)]) == 2
    assert "tta-stats" in capsys.readouterr().err
    plain = [
        "tta-stats",
        "--dataset",
        str(toy),
        "--model",
        "pkd-tiny",
        "--pretrained",
        "random",
        "--prototypes",
        str(tmp_path / "other"),
    ]
    assert main([*plain, "--augmented", "1"]) == 0
    bad = ["tta", "--method", "promptsync", *common, "--prototypes", str(tmp_path / "other"), "--out", str(out)]
    bad.append("--overwrite")  # the refusal below is for the prototypes, not for the earlier result
    assert main(bad) == 2
    assert "other base prompts" in capsys.readouterr().err
    assert main(["tta", "--method", "nope", "--datasets", str(toy), "--model", "pkd-tiny"]) == 2
