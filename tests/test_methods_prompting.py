"""The prompt-learning family: CoOp, CoCoOp, IVLP, MaPLe, PromptSRC (tiny random-weight CLIPs, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from promptkd.backbones import load_backbone
from promptkd.checkpoints import CheckpointError, convert_reference_state_dict
from promptkd.config import PRESETS_DIR, ConfigError, from_dict, list_presets, load_preset
from promptkd.data.templates import OPENAI_IMAGENET_TEMPLATES, PROMPTSRC_IMAGENET_TEMPLATES
from promptkd.data.world import get_dataset
from promptkd.engine.config import TrainConfig
from promptkd.methods import Batch, get_method
from promptkd.methods.base import config_from
from promptkd.methods.prompted import PromptConfigError
from promptkd.methods.promptsrc import diversity_prompts, gpa_weights, promptsrc_losses
from promptkd.prompts import PromptedImageEncoder, PromptedTextEncoder

CLASSES = ["cat", "dog", "red star", "blue ring"]
NEW_CLASSES = ["green cross", "yellow circle", "bird"]
METHODS = ["coop", "cocoop", "ivlp", "maple", "promptsrc"]
# Small settings that fit the 2-block tiny towers (the published depth 9 does not, see test_depth_is_never_clipped).
TINY = {
    "coop": {},
    "cocoop": {},
    "ivlp": {"text_depth": 2, "vision_depth": 2},
    "maple": {"depth": 2},
    "promptsrc": {"text_depth": 2, "vision_depth": 2},
}


def build(name: str, backbone, classnames=CLASSES, seed: int = 0, **overrides):
    cls = get_method(name)
    torch.manual_seed(seed)
    return cls(backbone, list(classnames), config_from(cls, {**TINY[name], **overrides}))


def batch(backbone, n: int = 8, n_classes: int = len(CLASSES), seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    return Batch(torch.randn(n, 3, size, size, generator=g), torch.randint(0, n_classes, (n,), generator=g))


def n_trainable(method) -> int:
    return sum(p.numel() for p in method.trainable_parameters())


@pytest.fixture(scope="module")
def world_teacher():
    torch.manual_seed(4)
    return load_backbone("pkd-world-teacher").freeze()


@pytest.fixture(scope="module")
def world_student():
    """Distinct tower widths (vision 96, text 64, embedding 64), so a transposed map cannot go unnoticed."""
    torch.manual_seed(3)
    return load_backbone("pkd-world-student").freeze()


# --- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_loss_falls_with_plain_sgd_loop(name, tiny_backbone):
    method = build(name, tiny_backbone)
    method.train()
    data = batch(tiny_backbone)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(10):
        out = method.training_step(data)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
        assert set(out.logs) >= {"ce"} and all(math.isfinite(v) for v in out.logs.values())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_step_and_float32_logits(name, tiny_backbone):
    method = build(name, tiny_backbone)
    data = batch(tiny_backbone, n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(data)
        out.loss.backward()
        method.eval()
        with torch.no_grad():
            logits = method.logits(data.images)
    assert math.isfinite(float(out.loss.detach()))
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in method.trainable_parameters())
    assert logits.dtype == torch.float32 and logits.shape == (4, len(CLASSES))


def test_unlabelled_batch_is_refused(tiny_backbone):
    method = build("coop", tiny_backbone)
    with pytest.raises(Exception, match="labelled"):
        method.training_step(Batch(batch(tiny_backbone).images))


# --- parameter counts ------------------------------------------------------------------------------------------------
def test_parameter_counts_match_the_formulas(tiny_backbone, wide_backbone, world_student):
    for b in (tiny_backbone, wide_backbone, world_student):
        wt, wv, e = b.text_width, b.vision_width, b.embed_dim
        names = CLASSES if b is not world_student else ["red star", "blue ring", "green cross"]
        c = len(names)
        assert n_trainable(build("coop", b, names)) == 16 * wt  # M·W_t, M = 16 random
        assert n_trainable(build("coop", b, names, ctx_init="a photo of a")) == 4 * wt  # M overridden to 4
        assert n_trainable(build("coop", b, names, class_specific=True)) == c * 16 * wt  # C·M·W_t
        h = e // 16
        assert n_trainable(build("cocoop", b, names)) == (e * h + h) + (h * wt + wt) + 4 * wt
        jt, jv = 2, min(3, b.vision_layers)
        ivlp = {"n_ctx_text": 2, "n_ctx_vision": 3, "text_depth": jt, "vision_depth": jv}
        assert n_trainable(build("ivlp", b, names, **ivlp)) == 2 * wt * jt + 3 * wv * jv
        assert n_trainable(build("promptsrc", b, names, **ivlp)) == 2 * wt * jt + 3 * wv * jv
        assert n_trainable(build("promptsrc", b, names)) == 4 * wt * 2 + 4 * wv * 2  # 4 + 4 tokens
        # MaPLe: J·(n·W_t + W_t·W_v + W_v) with n = 2, J = 2
        assert n_trainable(build("maple", b, names, depth=2)) == 2 * (2 * wt + wt * wv + wv)
    maple = build("maple", world_student, ["red star", "blue ring"], depth=2)
    assert maple.learner.coupling.layers[0].weight.shape == (world_student.vision_width, world_student.text_width)


def test_text_only_ivlp_has_no_visual_prompts(tiny_backbone):
    method = build("ivlp", tiny_backbone, n_ctx_vision=0, vision_depth=0)
    assert sorted(method.trainable_state()) == ["text.ctx", "text.deep"]
    assert method.logits(batch(tiny_backbone).images).shape == (8, len(CLASSES))
    with pytest.raises(ConfigError):
        build("ivlp", tiny_backbone, n_ctx_vision=2, vision_depth=0)


# --- CoOp specifics --------------------------------------------------------------------------------------------------
def test_coop_context_shapes_and_positions(tiny_backbone):
    w = tiny_backbone.text_width
    unified = build("coop", tiny_backbone, n_ctx=6)
    assert unified.learner.text.ctx.shape == (6, w)
    csc = build("coop", tiny_backbone, n_ctx=6, class_specific=True)
    assert csc.learner.text.ctx.shape == (len(CLASSES), 6, w)
    words = build("coop", tiny_backbone, ctx_init="a photo of a")
    ids = tiny_backbone.tokenize(["a photo of a"])
    assert torch.allclose(words.learner.text.ctx, tiny_backbone.model.token_embedding(ids)[0, 1:5])

    name = "red star"  # two tokens
    name_emb = tiny_backbone.model.token_embedding(tiny_backbone.tokenize([name]))[0, 1:3]
    for position, ctx_at, name_at in (("end", 1, 7), ("front", 3, 1), ("middle", 1, 4)):
        method = build("coop", tiny_backbone, n_ctx=6, class_token_position=position)
        prompts = method.learner.text.build()
        assert prompts.shape[:2] == (len(CLASSES), tiny_backbone.context_length)
        row = prompts[CLASSES.index(name)]
        ctx = method.learner.text.ctx
        assert torch.allclose(row[name_at : name_at + 2], name_emb)
        if position == "middle":
            assert torch.allclose(row[1:4], ctx[:3]) and torch.allclose(row[6:9], ctx[3:])
        else:
            assert torch.allclose(row[ctx_at : ctx_at + 6], ctx)
        assert method.logits(batch(tiny_backbone).images).shape == (8, len(CLASSES))
    with pytest.raises(ConfigError):
        build("coop", tiny_backbone, class_token_position="start")
    with pytest.raises(ConfigError):
        build("coop", tiny_backbone, class_specific=True, ctx_init="a photo of a")


def test_csc_refuses_other_classes(tiny_backbone):
    method = build("coop", tiny_backbone, class_specific=True)
    method.set_classnames(list(CLASSES))  # the same classes are fine
    with pytest.raises(PromptConfigError, match="class-specific"):
        method.set_classnames(NEW_CLASSES)
    with pytest.raises(PromptConfigError, match="class-specific"):
        method.set_classnames(list(reversed(CLASSES)))


@pytest.mark.parametrize("name", ["coop", "cocoop", "ivlp", "maple", "promptsrc"])
def test_set_classnames_base_to_new(name, tiny_backbone):
    method = build(name, tiny_backbone)
    images = batch(tiny_backbone).images
    method.eval()
    with torch.no_grad():
        assert method.logits(images).shape == (8, len(CLASSES))
        method.set_classnames(NEW_CLASSES)
        assert method.classnames == NEW_CLASSES
        logits = method.logits(images)
    assert logits.shape == (8, len(NEW_CLASSES)) and torch.isfinite(logits).all()
    if name == "promptsrc":
        assert method.fixed_text_features is None  # recomputed for a class list only when it is trained on


# --- CoCoOp specifics ------------------------------------------------------------------------------------------------
def test_cocoop_batched_prompts_equal_per_image_loop(tiny_backbone):
    method = build("cocoop", tiny_backbone)
    with torch.no_grad():
        method.learner.meta_net.linear2.weight.normal_(0, 0.5)  # make π(x) matter
    images = batch(tiny_backbone, n=5).images
    text = method.learner.text
    with torch.no_grad():
        batched = method.conditional_logits(images)
        rows = []
        for image in images:
            feature = method.image_features(image[None])
            ctx = text.ctx + method.learner.meta_net(feature)  # [M, W] + [1, W]
            t = F.normalize(method.text_encoder(text.build(ctx), text.token_ids).float(), dim=-1)
            rows.append(method.logit_scale() * feature @ t.t())
        chunked = build("cocoop", tiny_backbone, eval_text_batch=2 * len(CLASSES))
        chunked.load_trainable(method.trainable_state(), "memory")
        assert torch.allclose(chunked.logits(images), batched, atol=1e-5)
    assert torch.allclose(batched, torch.cat(rows), atol=1e-5)
    assert sorted(method.trainable_state()) == [
        "meta_net.linear1.bias",
        "meta_net.linear1.weight",
        "meta_net.linear2.bias",
        "meta_net.linear2.weight",
        "text.ctx",
    ]


# --- MaPLe specifics -------------------------------------------------------------------------------------------------
def test_maple_vision_prompts_are_the_coupled_text_prompts(world_student, world_teacher):
    method = build("maple", world_student, ["red star", "blue ring"], depth=2)
    text = method.learner.text
    layers = method.visual_prompts()
    assert len(layers) == 2
    assert torch.allclose(layers[0], method.learner.coupling.layers[0](text.ctx))
    assert torch.allclose(layers[1], method.learner.coupling.layers[1](text.deep[0]))
    assert all(k.startswith(("text.", "coupling.")) for k in method.trainable_state())
    # "a photo of a" with n = 2: "a photo" learnable, "of a" fixed words in the prompt
    ids = world_student.tokenize(["a photo of a"])
    assert torch.allclose(text.ctx, world_student.model.token_embedding(ids)[0, 1:3])
    assert torch.equal(text.token_ids[0, 1:5], ids[0, 1:5])
    deep3 = build("maple", world_teacher, ["red star"], depth=4).learner.coupling.layers
    assert torch.equal(deep3[1].weight, deep3[3].weight) and not torch.equal(deep3[0].weight, deep3[1].weight)


# --- depth checks ----------------------------------------------------------------------------------------------------
def test_depth_is_never_clipped(tiny_backbone):
    with pytest.raises(PromptConfigError, match="text_depth=9"):
        build("ivlp", tiny_backbone, text_depth=9)
    with pytest.raises(PromptConfigError, match="vision_depth=3"):
        build("ivlp", tiny_backbone, vision_depth=3)
    with pytest.raises(PromptConfigError, match="depth=9"):
        build("maple", tiny_backbone, depth=9)
    cls = get_method("promptsrc")
    published = load_preset("promptsrc", "vit_b16_c2_ep20_batch4_4+4ctx")["method"]
    with pytest.raises(PromptConfigError, match="blocks"):
        cls(tiny_backbone, CLASSES, config_from(cls, published))


# --- PromptSRC -------------------------------------------------------------------------------------------------------
def test_promptsrc_loss_function_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, c, e, s = 6, 5, 8, 20.0
    image = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    frozen_image = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    text = F.normalize(torch.randn(c, e, generator=g), dim=-1)
    fixed_text = 3.0 * torch.randn(c, e, generator=g)  # unnormalised template mean
    logits = s * image @ text.t()
    labels = torch.randint(0, c, (b,), generator=g)
    terms = promptsrc_losses(logits, labels, text, fixed_text, image, frozen_image, s, 25.0, 10.0)

    t_fixed = fixed_text / fixed_text.norm(dim=-1, keepdim=True)
    zs = s * frozen_image @ t_fixed.t()
    p_zs, p_p = zs.softmax(-1), logits.softmax(-1)
    ce = -(logits.log_softmax(-1)[torch.arange(b), labels]).mean()
    kl = (p_zs * (p_zs.log() - p_p.log())).sum() / (b * c)
    l_text = 25.0 * (text - t_fixed).abs().sum() / (c * e)
    l_image = 10.0 * (image - frozen_image).abs().sum() / (b * e)
    for key, value in (("ce", ce), ("kl", kl), ("text", l_text), ("image", l_image)):
        assert torch.allclose(terms[key], value, atol=1e-5), key
    assert torch.allclose(terms["loss"], ce + kl + l_text + l_image, atol=1e-5)


def test_promptsrc_step_terms_match_independent_references(tiny_backbone):
    method = build("promptsrc", tiny_backbone)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    data = batch(tiny_backbone, n=6)
    out = method.training_step(data)

    model = tiny_backbone.model
    with torch.no_grad():
        # textual diversity: PromptSRC's 60 templates through the plain CLIP text tower, averaged unnormalised
        feats = torch.stack(
            [
                model.encode_text(tiny_backbone.tokenize([t.format(c) for t in PROMPTSRC_IMAGENET_TEMPLATES]))
                for c in CLASSES
            ]
        )
        t_fixed = F.normalize(feats.mean(1), dim=-1)
        f_frozen = F.normalize(model.encode_image(data.images), dim=-1)
        text, image = method.text_features(), method.image_features(data.images)
        s = model.logit_scale.exp()
        logits = s * image @ text.t()
        zs = s * f_frozen @ t_fixed.t()
    assert torch.allclose(method.fixed_text_features, feats.mean(1), atol=1e-5)
    n = logits.numel()
    expected = {
        "ce": F.cross_entropy(logits, data.labels),
        "kl": (zs.softmax(-1) * (zs.log_softmax(-1) - logits.log_softmax(-1))).sum() / n,
        "text": 25.0 * (text - t_fixed).abs().mean(),
        "image": 10.0 * (image - f_frozen).abs().mean(),
    }
    for key, value in expected.items():
        assert out.logs[key] == pytest.approx(float(value), rel=1e-4, abs=1e-5), key
    assert float(out.loss.detach()) == pytest.approx(sum(float(v) for v in expected.values()), rel=1e-4)


def test_promptsrc_diversity_templates():
    world = get_dataset("shapes")
    prompts = diversity_prompts(["red star", "blue ring"])
    assert prompts[0] == [t.format("red star") for t in world.templates]
    counts = get_dataset("counts")
    assert diversity_prompts([counts.classnames[0]])[0] == [t.format(counts.classnames[0]) for t in counts.templates]
    mixed = diversity_prompts(["red star", "golden_retriever"])  # not all world classes: PromptSRC's own 60
    assert len(mixed[0]) == 60 and mixed[1][0] == "a photo of a golden retriever."
    assert diversity_prompts(["red star"], "promptsrc60") == [
        [t.format("red star") for t in PROMPTSRC_IMAGENET_TEMPLATES]
    ]
    for name in ("openai80", "openai"):  # "openai": the name stored configs use
        prompts = diversity_prompts(["golden_retriever"], name)[0]
        assert (
            len(prompts) == len(OPENAI_IMAGENET_TEMPLATES) == 80 and prompts[0] == "a bad photo of a golden retriever."
        )
    cls = get_method("promptsrc")
    assert config_from(cls, {}).diversity_templates == "auto"
    assert config_from(cls, {"diversity_templates": "openai80"}).diversity_templates == "openai80"
    with pytest.raises(ConfigError, match="promptsrc60"):
        config_from(cls, {"diversity_templates": "imagenet60"})


@pytest.mark.parametrize(("epochs", "mean", "std"), [(20, 15, 1), (20, 6, 10), (50, 30, 30), (50, 45, 5), (5, 15, 1)])
def test_gpa_weights_are_the_normalised_gaussian(epochs, mean, std):
    weights = gpa_weights(epochs, mean, std)
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    expected = torch.tensor(density, dtype=torch.float64) / sum(density)
    assert weights.shape == (epochs,) and float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(weights, expected, rtol=1e-9, atol=1e-300)
    if (epochs, mean, std) == (20, 15, 1):
        assert float(weights[12:17].sum()) > 0.99  # mass on epochs 13-17


def _fake_epoch(method, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in method.trainable_state().items()}


def test_gpa_accumulates_the_weighted_sum_and_survives_resume(tiny_backbone):
    method = build("promptsrc", tiny_backbone, gpa_mean=2.0, gpa_std=1.0)
    weights = gpa_weights(3, 2.0, 1.0)
    thetas = [_fake_epoch(method, seed) for seed in range(3)]
    expected = {k: sum(float(w) * theta[k] for w, theta in zip(weights, thetas)) for k in thetas[0]}
    assert sorted(expected) == ["text.ctx", "text.deep", "visual.prompts"]  # only the prompts, never the CLIP

    for epoch, theta in enumerate(thetas, start=1):
        method.load_trainable(theta, "fake epoch")
        method.on_epoch_end(epoch, 3)
    method.on_train_end()
    for key, value in method.trainable_state().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key

    # a run interrupted after epoch 2 and resumed from its checkpoint aggregates the same prompts
    first = build("promptsrc", tiny_backbone, gpa_mean=2.0, gpa_std=1.0)
    for epoch, theta in enumerate(thetas[:2], start=1):
        first.load_trainable(theta, "fake epoch")
        first.on_epoch_end(epoch, 3)
    state = first.resume_state()
    assert state and all(v.dtype in (torch.float32, torch.float64) for v in state.values())
    resumed = build("promptsrc", tiny_backbone, seed=5, gpa_mean=2.0, gpa_std=1.0)
    resumed.load_trainable(thetas[1], "checkpoint")
    resumed.load_resume_state(state)
    resumed.load_trainable(thetas[2], "fake epoch")
    resumed.on_epoch_end(3, 3)
    resumed.on_train_end()
    for key, value in resumed.trainable_state().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    with pytest.raises(CheckpointError):
        build("promptsrc", tiny_backbone, n_ctx_text=2).load_resume_state(state)
    twice = build("promptsrc", tiny_backbone)
    twice.on_epoch_end(1, 3)
    with pytest.raises(ValueError, match="epoch 1"):
        twice.on_epoch_end(1, 3)  # an epoch is never counted twice
    assert build("promptsrc", tiny_backbone, gpa=False).resume_state() == {}


# --- checkpoints -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip(name, tiny_backbone, tmp_path: Path):
    method = build(name, tiny_backbone)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = method.save(tmp_path / name)
    other = build(name, tiny_backbone, seed=7)
    other.load(path)
    for key, value in method.trainable_state().items():
        assert torch.equal(other.trainable_state()[key], value), key
    images = batch(tiny_backbone).images
    method.eval()
    other.eval()
    with torch.no_grad():
        assert torch.allclose(other.logits(images), method.logits(images), atol=1e-6)


def test_checkpoint_of_another_method_is_refused(tiny_backbone, tmp_path):
    path = build("coop", tiny_backbone).save(tmp_path / "coop")
    with pytest.raises(CheckpointError, match="method 'coop'"):
        build("ivlp", tiny_backbone).load(path)
    with pytest.raises(CheckpointError, match="does not fit"):  # same keys, other shapes: strict loading
        build("coop", tiny_backbone, ctx_init="a photo of a").load(path)


def _reference_teacher(backbone, n_ctx=4, depth=2):
    """A PromptSRC/IVLP state dict with the public code's key names."""
    g = torch.Generator().manual_seed(11)
    wt, wv = backbone.text_width, backbone.vision_width
    state = {
        "prompt_learner.ctx": torch.randn(n_ctx, wt, generator=g),
        "prompt_learner.token_prefix": torch.randn(3, 1, wt, generator=g),
        "prompt_learner.token_suffix": torch.randn(3, 72, wt, generator=g),
        "image_encoder.VPT": torch.randn(n_ctx, wv, generator=g),
        "prompt_learner.ZS_image_encoder.conv1.weight": backbone.model.visual.conv1.weight.clone(),
        "logit_scale": backbone.model.logit_scale.clone(),
    }
    for i in range(1, depth):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, wt, generator=g)
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, wv, generator=g)
    return state


@pytest.mark.parametrize("name", ["ivlp", "promptsrc"])
def test_reference_teacher_loads_strictly_and_gives_the_same_logits(name, tiny_backbone):
    state = _reference_teacher(tiny_backbone)
    tensors, report = convert_reference_state_dict(state, "model.pth.tar-20")
    assert report.method == "promptsrc"
    settings = {"n_ctx_text": 4, "n_ctx_vision": 4, "text_depth": 2, "vision_depth": 2}
    method = build(name, tiny_backbone, **settings)
    method.load_trainable(tensors, "x")
    images = batch(tiny_backbone, n=3).images

    by_hand = build(name, tiny_backbone, seed=9, **settings)
    with torch.no_grad():
        by_hand.learner.text.ctx.copy_(state["prompt_learner.ctx"])
        by_hand.learner.text.deep[0].copy_(state["text_encoder.transformer.resblocks.1.VPT_shallow"])
        by_hand.learner.visual.prompts[0].copy_(state["image_encoder.VPT"])
        by_hand.learner.visual.prompts[1].copy_(state["image_encoder.transformer.resblocks.1.VPT_shallow"])

        text_encoder = PromptedTextEncoder(tiny_backbone.model)
        image_encoder = PromptedImageEncoder(tiny_backbone.model)
        ids = tiny_backbone.tokenize([f"a photo of a {c}." for c in CLASSES])
        embeddings = text_encoder.embed_tokens(ids)
        embeddings[:, 1:5] = state["prompt_learner.ctx"]
        text = text_encoder(embeddings, ids, [state["text_encoder.transformer.resblocks.1.VPT_shallow"]])
        vpt = [state["image_encoder.VPT"], state["image_encoder.transformer.resblocks.1.VPT_shallow"]]
        image = image_encoder(images, vpt)
        expected = tiny_backbone.model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
        assert torch.allclose(method.logits(images), expected, atol=1e-4)
        assert torch.allclose(by_hand.logits(images), expected, atol=1e-4)
    with pytest.raises(CheckpointError):
        build(name, tiny_backbone, n_ctx_text=2, n_ctx_vision=4, text_depth=2, vision_depth=2).load_trainable(
            tensors, "x"
        )


# --- inference cache -------------------------------------------------------------------------------------------------
def test_cached_inference_text_features_follow_the_prompts(tiny_backbone):
    method = build("ivlp", tiny_backbone).eval()
    images = batch(tiny_backbone).images
    with torch.no_grad():
        first = method.logits(images)
        assert torch.equal(method.logits(images), first)
        method.learner.text.ctx.add_(torch.randn_like(method.learner.text.ctx))  # in place, like an optimiser step
        changed = method.logits(images)
        fresh, _, _ = method.prompted_logits(images)
    assert not torch.allclose(changed, first) and torch.allclose(changed, fresh, atol=1e-6)


# --- presets ---------------------------------------------------------------------------------------------------------
PRESETS = [(m, p) for m in METHODS for p in list_presets(m)]


def test_every_method_has_published_and_world_presets():
    for method in METHODS:
        assert "world" in list_presets(method) and len(list_presets(method)) >= 3, method
    assert "vit_l14_c2_ep20_batch8_4+4ctx" in list_presets("promptsrc")
    assert len(PRESETS) == sum(len(list((PRESETS_DIR / m).glob("*.yaml"))) for m in METHODS)


@pytest.mark.parametrize(("method", "preset"), PRESETS, ids=[f"{m}/{p}" for m, p in PRESETS])
def test_preset_loads(method, preset):
    data = load_preset(method, preset)
    assert set(data) == {"method", "train"}
    config = config_from(get_method(method), data["method"])
    train = from_dict(TrainConfig, data["train"], where=f"{method}/{preset} train")
    assert train.optimizer == "sgd" and train.scheduler == "cosine" and train.warmup_epochs == 1
    assert train.warmup_type == "constant" and train.warmup_lr == pytest.approx(1e-5)
    assert train.weight_decay == pytest.approx(5e-4) and train.momentum == pytest.approx(0.9)
    if preset == "world":
        assert train.precision == "fp32" and train.epochs <= 10
    if method == "promptsrc":
        assert (config.text_loss_weight, config.image_loss_weight) == (25.0, 10.0)


@pytest.mark.parametrize("method", METHODS)
def test_world_presets_fit_the_world_models(method, world_student, world_teacher):
    data = load_preset(method, "world")["method"]
    classes = list(get_dataset("patterns").base_classnames)
    cls = get_method(method)
    for backbone in (world_student, world_teacher):
        instance = cls(backbone, classes, config_from(cls, data))
        assert instance.logits(batch(backbone, n=2).images).shape == (2, len(classes))
