"""Baselines with a fixed text side: zero-shot CLIP, VPT-deep, visual prompting, CLIP-Adapter, Tip-Adapter(-F);
their presets; and `promptkd inspect --nearest` on a CoOp-like checkpoint."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import promptkd.methods.tip_adapter  # noqa: F401  (registers tip_adapter_f until BUILTIN_METHODS lists it)
from promptkd.config import PRESETS_DIR, from_dict, load_yaml
from promptkd.engine.config import TrainConfig
from promptkd.evaluation.zeroshot import clear_text_cache
from promptkd.methods import Batch, get_method
from promptkd.methods.tip_adapter import ClassBoundError, search_grid
from promptkd.methods.visual_prompting import PaddingPrompt, padding_width

CLASSES = ["red star", "blue ring", "green cross", "yellow circle"]
TRAINABLE = ["vpt", "vp", "clip_adapter", "tip_adapter_f"]
ALL_METHODS = ["zeroshot", *TRAINABLE, "tip_adapter"]
PRESET_METHODS = ["zeroshot", "vpt", "vp", "clip_adapter", "tip_adapter", "tip_adapter_f"]
SMALL_TIP = {"augment_epochs": 2, "beta_steps": 10, "alpha_steps": 5}


def make(name: str, backbone, classnames=CLASSES, **overrides):
    cls = get_method(name)
    options = {"vpt": {"n_tokens": 2, "depth": 2}}.get(name, {})
    if name.startswith("tip_adapter"):
        options = dict(SMALL_TIP)
    return cls(backbone, list(classnames), cls.config_class(**{**options, **overrides}))


def images(backbone, n: int, seed: int) -> torch.Tensor:
    size = backbone.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def few_shot(backbone, shots: int = 2, seed: int = 0) -> list[Batch]:
    """Two batches covering shots x classes images, with sample indices."""
    n = shots * len(CLASSES)
    x, y = images(backbone, n, seed), torch.arange(len(CLASSES)).repeat_interleave(shots)
    half = n // 2
    return [Batch(x[:half], y[:half], torch.arange(half)), Batch(x[half:], y[half:], torch.arange(half, n))]


def augmented(batches: list[Batch], noise: float = 0.1):
    """A re-iterable source whose every pass perturbs the images differently and reverses the batch order."""
    state = {"pass": 0}

    def source():
        g = torch.Generator().manual_seed(100 + state["pass"])
        state["pass"] += 1
        for b in reversed(batches):
            yield Batch(b.images + noise * torch.randn(b.images.shape, generator=g), b.labels, b.index)

    return source


def prepared(name: str, backbone, **overrides):
    method = make(name, backbone, **overrides)
    if name.startswith("tip_adapter"):
        method.prepare(augmented(few_shot(backbone)), lambda: iter(few_shot(backbone, seed=1)))
    return method


@pytest.mark.parametrize("name", TRAINABLE)
def test_training_lowers_the_loss(tiny_backbone, name):
    torch.manual_seed(0)
    method = prepared(name, tiny_backbone).train()
    batch = Batch(images(tiny_backbone, 8, seed=3), torch.arange(len(CLASSES)).repeat(2))
    params = method.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    optimizer = torch.optim.AdamW(params, lr=0.05 if name != "tip_adapter_f" else 0.01, weight_decay=0.0)
    losses = []
    for _ in range(6):
        loss = method.training_step(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_training_free_methods_refuse_to_train(tiny_backbone):
    batch = Batch(images(tiny_backbone, 2, seed=0), torch.tensor([0, 1]))
    for name in ("zeroshot", "tip_adapter"):
        method = prepared(name, tiny_backbone)
        assert type(method).trains is False and method.trainable_parameters() == []
        with pytest.raises(Exception, match="training-free|nothing to train"):
            method.training_step(batch)
    assert get_method("tip_adapter_f").trains is True


def _by_hand_classifier(model, tokenizer, templates):
    with torch.no_grad():
        columns = []
        for name in CLASSES:
            feats = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            columns.append(F.normalize(feats.mean(0), dim=-1))
    return torch.stack(columns)  # [C, E]


@pytest.fixture(scope="module")
def openai_scaled_backbone():
    """A pkd-tiny whose logit scale is OpenAI's (ln 100 stored, s = 100)."""
    from promptkd.backbones import load_backbone

    torch.manual_seed(5)
    backbone = load_backbone("pkd-tiny").freeze()
    backbone.model.logit_scale.data.fill_(math.log(100.0))
    return backbone


@pytest.mark.parametrize("templates", [["a photo of a {}."], ["a photo of a {}.", "art of the {}."]])
def test_zeroshot_logits_are_100_cos(openai_scaled_backbone, templates):
    backbone = openai_scaled_backbone
    method = make("zeroshot", backbone, templates=templates)
    x = images(backbone, 3, seed=4)
    text = _by_hand_classifier(backbone.model, backbone.tokenizer, templates)
    with torch.no_grad():
        expected = 100.0 * F.normalize(backbone.model.encode_image(x), dim=-1) @ text.T
        assert torch.allclose(method.logits(x), expected, atol=1e-4)
    assert method.trainable_state() == {}


@pytest.mark.parametrize("name", TRAINABLE)
def test_fixed_text_side_is_computed_once(tiny_backbone, name):
    calls = []
    hook = tiny_backbone.text_tower.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        clear_text_cache()
        method = prepared(name, tiny_backbone).train()
        built = len(calls)
        assert built >= 1
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
        batch = Batch(images(tiny_backbone, 4, seed=0), torch.tensor([0, 1, 2, 3]))
        for _ in range(3):
            loss = method.training_step(batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            method.logits(batch.images)
        assert len(calls) == built
    finally:
        hook.remove()


def test_vpt_depth_beyond_the_tower_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="depth=12 but the image tower .* has only 2 blocks"):
        make("vpt", tiny_backbone, depth=12)
    method = make("vpt", tiny_backbone)
    assert method.trainable_state()["visual.prompts"].shape == (2, 2, tiny_backbone.vision_width)


def test_vp_padding_leaves_the_centre_and_counts(tiny_backbone):
    method = make("vp", tiny_backbone)
    size = tiny_backbone.image_size
    p = padding_width(size, 30, 224)
    assert p == round(size * 30 / 224) == 4
    x = images(tiny_backbone, 2, seed=0)
    delta = method.prompt_images(x) - x
    assert torch.equal(delta[..., p : size - p, p : size - p], torch.zeros_like(delta[..., p : size - p, p : size - p]))
    border = torch.ones(size, size, dtype=torch.bool)
    border[p : size - p, p : size - p] = False
    assert bool((delta[..., border] != 0).all())
    n_values = sum(p.numel() for p in method.trainable_parameters())
    assert n_values == 2 * 3 * p * size + 2 * 3 * p * (size - 2 * p) == 1344
    assert sum(t.numel() for t in PaddingPrompt(224, 30).parameters()) == 69_840  # the paper's setting


def test_clip_adapter_residual_mix(tiny_backbone):
    method = make("clip_adapter", tiny_backbone, alpha=0.3)
    x = images(tiny_backbone, 3, seed=2)
    w1, w2 = (method.trainable_state()[f"adapter.fc.{i}.weight"] for i in (0, 2))
    assert w1.shape == (tiny_backbone.embed_dim // 4, tiny_backbone.embed_dim) and w2.shape == w1.T.shape
    with torch.no_grad():
        f = tiny_backbone.model.encode_image(x)
        mixed = 0.3 * torch.relu(torch.relu(f @ w1.T) @ w2.T) + 0.7 * f
        assert torch.allclose(method.adapt(f), mixed, atol=1e-6)
        expected = tiny_backbone.logit_scale * F.normalize(mixed, dim=-1) @ method.text_features.T
        assert torch.allclose(method.logits(x), expected, atol=1e-5)


def test_tip_adapter_logits_by_hand(tiny_backbone):
    method = prepared("tip_adapter", tiny_backbone)
    train = few_shot(tiny_backbone)
    source = augmented(train)
    with torch.no_grad():
        passes = []
        for _ in range(2):  # the same two augmented passes prepare() saw, re-ordered by sample index
            batches = list(source())[::-1]
            passes.append(torch.cat([tiny_backbone.model.encode_image(b.images) for b in batches]))
        keys = F.normalize(sum(passes) / 2, dim=-1)
        values = F.one_hot(torch.cat([b.labels for b in train]), len(CLASSES)).float()
        assert torch.allclose(method.learner.cache.keys, keys, atol=1e-5)
        alpha, beta = float(method.learner.cache.alpha), float(method.learner.cache.beta)
        x = images(tiny_backbone, 5, seed=9)
        f = F.normalize(tiny_backbone.model.encode_image(x), dim=-1)
        expected = tiny_backbone.logit_scale * f @ method.text_features.T
        expected = expected + alpha * torch.exp(-beta * (1 - f @ keys.T)) @ values
        assert torch.allclose(method.logits(x), expected, atol=1e-4)


def test_tip_adapter_hyperparameters_come_from_validation_only(tiny_backbone):
    method = prepared("tip_adapter", tiny_backbone)
    cache, result = method.learner.cache, method.search_result
    chosen = (result["alpha"], result["beta"])
    assert result["source"] == "validation" and result["val_samples"] == 2 * len(CLASSES)
    assert torch.allclose(torch.stack([cache.alpha, cache.beta]), torch.tensor(chosen))
    cfg = method.config
    betas, alphas = search_grid(*cfg.beta_range, cfg.beta_steps), search_grid(*cfg.alpha_range, cfg.alpha_steps)
    assert chosen[0] in alphas and chosen[1] in betas
    # the pair is the first best one on the validation batches (beta-major), found by brute force
    val = few_shot(tiny_backbone, seed=1)
    with torch.no_grad():
        f = F.normalize(tiny_backbone.model.encode_image(torch.cat([b.images for b in val])), dim=-1)
        y = torch.cat([b.labels for b in val])
        accuracy = {
            (a, b): float((method.tip_logits(f, a, b).argmax(-1) == y).float().mean()) for b in betas for a in alphas
        }
    best = max(accuracy.values())
    assert accuracy[chosen] == best
    assert next(pair for pair in ((a, b) for b in betas for a in alphas) if accuracy[pair] == best) == chosen
    # evaluating on any test data leaves them alone; a second run with other test data chooses the same
    with torch.no_grad():
        method.logits(images(tiny_backbone, 6, seed=20))
        method.logits(images(tiny_backbone, 6, seed=21) * 3)
    assert torch.allclose(torch.stack([cache.alpha, cache.beta]), torch.tensor(chosen))
    other = prepared("tip_adapter", tiny_backbone)
    assert (other.search_result["alpha"], other.search_result["beta"]) == chosen
    # without validation data the initial values stay, with a warning
    lonely = make("tip_adapter", tiny_backbone)
    with pytest.warns(UserWarning, match="no validation data"):
        lonely.prepare(augmented(few_shot(tiny_backbone)), None)
    assert torch.allclose(
        torch.stack([lonely.learner.cache.alpha, lonely.learner.cache.beta]), torch.tensor([1.17, 1.0])
    )
    assert lonely.search_result["source"] == "init"


def test_tip_adapter_is_bound_to_its_classes(tiny_backbone):
    method = prepared("tip_adapter", tiny_backbone)
    method.set_classnames(list(CLASSES))  # the same list is fine
    with pytest.raises(ClassBoundError, match="cannot score 2 other classes"):
        method.set_classnames(["purple hexagon", "pink diamond"])
    with pytest.raises(Exception, match="cache is empty"):
        make("tip_adapter", tiny_backbone).logits(images(tiny_backbone, 1, seed=0))


def test_tip_adapter_cache_matches_passes_by_index(tiny_backbone):
    method = make("tip_adapter", tiny_backbone)
    x, y = images(tiny_backbone, 8, seed=0), torch.arange(len(CLASSES)).repeat_interleave(2)
    shifts = [torch.zeros_like(x), 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))]
    subsets = [torch.tensor([5, 0, 3, 1, 4, 2]), torch.tensor([7, 2, 6, 3, 5, 4])]  # as drop_last under 2 shuffles
    state = {"pass": 0}

    def partial_passes():
        k = state["pass"] % 2
        state["pass"] += 1
        ids = subsets[k]
        yield Batch(x[ids] + shifts[k][ids], y[ids], ids)

    keys, labels = method.build_cache(partial_passes)
    with torch.no_grad():
        f = [tiny_backbone.model.encode_image(x + shift) for shift in shifts]
    expected = torch.cat([f[0][:2], (f[0][2:6] + f[1][2:6]) / 2, f[1][6:]])
    assert torch.equal(labels, y) and torch.allclose(keys, F.normalize(expected, dim=-1), atol=1e-5)

    def shuffled_without_index():
        state["pass"] += 1
        order = torch.arange(8) if state["pass"] % 2 else torch.arange(8).flip(0)
        yield Batch(x[order], y[order])

    with pytest.raises(Exception, match="sample index"):
        method.build_cache(shuffled_without_index)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_save_load_round_trip(tiny_backbone, tmp_path, name):
    torch.manual_seed(1)
    first = prepared(name, tiny_backbone)
    with torch.no_grad():
        for param in first.trainable_parameters():
            param.add_(0.1 * torch.randn_like(param))
    if name.startswith("tip_adapter"):
        first.learner.cache.set_hyperparameters(0.7, 2.5)
    path = first.save(tmp_path / name)
    torch.manual_seed(2)
    second = make(name, tiny_backbone)  # fresh: other random init, no cache
    config = second.load(path)
    assert config["method"] == name
    x = images(tiny_backbone, 3, seed=7)
    with torch.no_grad():
        assert torch.allclose(first.logits(x), second.logits(x), atol=1e-6)
    assert set(second.trainable_state()) == set(first.trainable_state())


def test_template_lists_and_named_sets():
    from promptkd.config import ConfigError
    from promptkd.methods.zeroshot import ZeroShotConfig, resolve_template_list

    assert resolve_template_list(["a {} in a video game."]) == ["a {} in a video game."]
    assert len(resolve_template_list(["ensemble"])) == 8 and len(resolve_template_list(["openai"])) == 80
    with pytest.raises(ConfigError, match="placeholder"):
        from_dict(ZeroShotConfig, {"templates": ["a photo of a cat."]})


def _presets() -> list[tuple[str, Path]]:
    return [(m, p) for m in PRESET_METHODS for p in sorted((PRESETS_DIR / m).glob("*.yaml"))]


@pytest.mark.parametrize(("name", "path"), _presets(), ids=lambda v: v if isinstance(v, str) else v.stem)
def test_presets_load(name, path):
    data = load_yaml(path)
    assert set(data) == {"method", "train"}
    config = from_dict(get_method(name).config_class, data["method"], where=str(path))
    train = from_dict(TrainConfig, data["train"], where=str(path))
    assert (train.epochs == 0) == (not get_method(name).trains)
    if name == "vpt" and path.stem != "world":
        assert (config.n_tokens, config.depth, train.lr, train.epochs, train.batch_size) == (8, 12, 0.0025, 5, 4)


@pytest.fixture(scope="module")
def world_backbones():
    from promptkd.backbones import load_backbone

    torch.manual_seed(0)
    return [load_backbone(model).freeze() for model in ("pkd-world-student", "pkd-world-teacher")]


@pytest.mark.parametrize("name", PRESET_METHODS)
def test_world_presets_build_on_the_world_models(name, world_backbones):
    data = load_yaml(PRESETS_DIR / name / "world.yaml")
    cls = get_method(name)
    for backbone in world_backbones:  # e.g. the VPT depth fits both world towers (3 and 4 blocks)
        cls(backbone, CLASSES, from_dict(cls.config_class, data["method"]))


def _inspect(argv: list[str]) -> int:
    from promptkd.cli import inspect

    parser = argparse.ArgumentParser(prog="promptkd inspect")
    inspect.add_arguments(parser)
    return inspect.run(parser.parse_args(argv))


def test_inspect_nearest_words_of_a_coop_context(tiny_backbone, tmp_path, capsys):
    from safetensors.torch import save_file

    from promptkd.backbones import load_backbone
    from promptkd.checkpoints import save_checkpoint
    from promptkd.prompts import PromptedTextEncoder, TextPromptLearner

    weights = tmp_path / "tiny.safetensors"
    save_file(dict(tiny_backbone.model.state_dict()), str(weights))
    backbone = load_backbone("pkd-tiny", str(weights))
    learner = TextPromptLearner(PromptedTextEncoder(backbone.model), backbone.tokenizer, CLASSES, init="a photo of a")
    ctx = learner.ctx.detach() + 1e-4  # a slightly moved context still reads as its words
    config = {"method": "coop", "backbone": backbone.spec.to_dict(), "classnames": CLASSES}
    path = save_checkpoint(tmp_path / "coop", {"text.ctx": ctx}, config)
    assert _inspect([str(path), "--nearest", "2"]) == 0
    out = capsys.readouterr().out
    assert "| text.ctx | [4, 64]" in out and "| text   | 1       | 256" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "(" in line and "nearest" not in line]
    firsts = [row.split("|")[2].split(",")[0].split("(")[0].strip() for row in rows]
    assert firsts == ["a", "photo", "of", "a"]
    assert all(row.count("(") == 2 for row in rows)  # K = 2 neighbours each
    assert _inspect([str(path)]) == 0 and "nearest words" not in capsys.readouterr().out
