"""Prompted encoders: exact equality with open_clip when prompts are empty, and the deep-prompt rules."""

from __future__ import annotations

import pytest
import torch

from promptkd.backbones import load_backbone
from promptkd.prompts import (
    MultimodalCoupling,
    PromptedImageEncoder,
    PromptedTextEncoder,
    TextPromptLearner,
    UnsupportedModelError,
    VisualPrompts,
)

TEXTS = ["a photo of a cat.", "a red star", "an extremely long description of a very small blue hexagon"]


@pytest.mark.parametrize("fixture", ["tiny_backbone", "customtext_backbone", "wide_backbone"])
def test_empty_prompts_reproduce_open_clip(fixture, request):
    backbone = request.getfixturevalue(fixture)
    text_encoder, image_encoder = PromptedTextEncoder(backbone.model), PromptedImageEncoder(backbone.model)
    ids = backbone.tokenize(TEXTS)
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(text_encoder.encode_ids(ids), backbone.model.encode_text(ids), atol=1e-5)
        assert torch.allclose(text_encoder.encode_ids(ids, truncate=False), backbone.model.encode_text(ids), atol=1e-5)
        assert torch.allclose(image_encoder(images), backbone.model.encode_image(images), atol=1e-5)


@pytest.mark.slow
def test_empty_prompts_reproduce_open_clip_vit_b16():
    torch.manual_seed(0)
    backbone = load_backbone("ViT-B-16").freeze()
    assert (backbone.vision_width, backbone.text_width, backbone.embed_dim) == (768, 512, 512)
    assert backbone.grid_size == (14, 14) and backbone.image_size == 224 and backbone.context_length == 77
    ids = backbone.tokenize(TEXTS)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(
            PromptedTextEncoder(backbone.model).encode_ids(ids), backbone.model.encode_text(ids), atol=1e-5
        )
        assert torch.allclose(
            PromptedImageEncoder(backbone.model)(images), backbone.model.encode_image(images), atol=1e-5
        )


def _manual_text(backbone, embeddings, ids, deep):
    """Independent re-statement of the IVLP text rule: replace positions 1..n before blocks 1..len(deep)."""
    model = backbone.model
    x = embeddings + model.positional_embedding
    for index, block in enumerate(model.transformer.resblocks):
        if 1 <= index <= len(deep):
            n = deep[index - 1].shape[0]
            x = x.clone()
            x[:, 1 : 1 + n] = deep[index - 1]
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ model.text_projection


def _manual_image(backbone, images, prompts):
    """Independent re-statement of the VPT-deep rule on open_clip's own private pieces."""
    visual = backbone.model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1) + visual.positional_embedding
    n = prompts.shape[1]
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], 1))
    for index, block in enumerate(visual.transformer.resblocks):
        if 1 <= index < prompts.shape[0]:
            x = x.clone()
            x[:, -n:] = prompts[index]
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def test_deep_text_prompts_follow_ivlp_rule(tiny_backbone):
    encoder = PromptedTextEncoder(tiny_backbone.model)
    ids = tiny_backbone.tokenize(TEXTS)
    deep = torch.randn(1, 3, encoder.width) * 0.1
    with torch.no_grad():
        embeddings = encoder.embed_tokens(ids)
        ours = encoder(embeddings, ids, deep)
        reference = _manual_text(tiny_backbone, embeddings, ids, deep)
        plain = encoder(embeddings, ids)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_deep_visual_prompts_follow_vpt_rule_and_batch(tiny_backbone):
    encoder = PromptedImageEncoder(tiny_backbone.model)
    prompts = VisualPrompts(n_tokens=3, depth=2, width=encoder.width, generator=torch.Generator().manual_seed(0))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ours = encoder(images, prompts())
        assert torch.allclose(ours, _manual_image(tiny_backbone, images, prompts.prompts), atol=1e-5)
        assert not torch.allclose(ours, encoder(images), atol=1e-3)
        per_sample = torch.stack([prompts.prompts * (i + 1) for i in range(4)])  # [N, depth, n, D]
        batched = encoder(images, per_sample)
        singles = torch.cat([encoder(images[i : i + 1], prompts.prompts * (i + 1)) for i in range(4)])
    assert torch.allclose(batched, singles, atol=1e-5)


def test_block_hook_sees_prompted_tokens(tiny_backbone):
    encoder = PromptedImageEncoder(tiny_backbone.model)
    prompts = torch.zeros(2, 5, encoder.width)
    seen = []
    with torch.no_grad():
        encoder(torch.randn(2, 3, 32, 32), prompts, block_hook=lambda i, x: seen.append((i, tuple(x.shape))))
    tokens = 1 + tiny_backbone.grid_size[0] * tiny_backbone.grid_size[1] + 5
    assert seen == [(0, (2, tokens, encoder.width)), (1, (2, tokens, encoder.width))]


def test_prompt_shape_errors(tiny_backbone):
    image_encoder = PromptedImageEncoder(tiny_backbone.model)
    with pytest.raises(ValueError, match="3 prompt layers given but the tower has 2 blocks"):
        image_encoder(torch.randn(1, 3, 32, 32), torch.zeros(3, 2, image_encoder.width))
    with pytest.raises(ValueError, match="width 7, the tower's width is 64"):
        image_encoder(torch.randn(1, 3, 32, 32), torch.zeros(1, 2, 7))


def test_resnet_tower_is_refused_for_prompts():
    backbone = load_backbone("RN50")
    encoder = PromptedImageEncoder(backbone.model)
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet image towers"):
        encoder(torch.randn(1, 3, 224, 224), torch.zeros(1, 2, 64))


@pytest.mark.parametrize("fixture", ["tiny_backbone", "customtext_backbone"])
def test_coop_phrase_init_reproduces_plain_prompts(fixture, request):
    backbone = request.getfixturevalue(fixture)
    classes = ["cat", "red_star", "small blue hexagon"]
    learner = TextPromptLearner(PromptedTextEncoder(backbone.model), backbone.tokenizer, classes, init="a photo of a")
    assert learner.n_ctx == 4 and tuple(learner.ctx.shape) == (4, backbone.text_width)
    with torch.no_grad():
        ours = learner.encode(normalize=False)
        plain = backbone.model.encode_text(backbone.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in classes]))
    assert torch.allclose(ours, plain, atol=1e-5)


def test_coop_positions_place_class_tokens(tiny_backbone):
    encoder = PromptedTextEncoder(tiny_backbone.model)
    classes = ["cat", "red star"]
    for position in ("end", "front", "middle"):
        learner = TextPromptLearner(
            encoder,
            tiny_backbone.tokenizer,
            classes,
            n_ctx=4,
            init=None,
            position=position,
            generator=torch.Generator().manual_seed(0),
        )
        embeddings, token_ids = learner()
        assert embeddings.shape == (2, 77, 64) and token_ids.shape == (2, 77)
        for c, name in enumerate(classes):
            k = len(tiny_backbone.tokenizer.encode(name))
            start = {"end": 5, "front": 1, "middle": 3}[position]
            ctx_slots = {"end": [1, 2, 3, 4], "front": [1 + k, 2 + k, 3 + k, 4 + k], "middle": [1, 2, 3 + k, 4 + k]}
            expected_name = encoder.embed_tokens(tiny_backbone.tokenize(name))[0, 1 : 1 + k]
            assert torch.allclose(embeddings[c, start : start + k], expected_name)
            assert torch.allclose(embeddings[c, ctx_slots[position]], learner.ctx)
            assert int(token_ids[c].argmax()) == 1 + 4 + k + 1  # EOT after ctx, name and "."


def test_coop_class_specific_and_random_init(tiny_backbone):
    encoder = PromptedTextEncoder(tiny_backbone.model)
    learner = TextPromptLearner(
        encoder,
        tiny_backbone.tokenizer,
        ["a", "b", "c"],
        n_ctx=16,
        init=None,
        class_specific=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert tuple(learner.ctx.shape) == (3, 16, 64)
    assert 0.015 < float(learner.ctx.detach().std()) < 0.025
    embeddings, _ = learner()
    assert torch.allclose(embeddings[1, 1:17], learner.ctx[1])
    with pytest.raises(ValueError, match="learnt for 3 classes and cannot be used with 2"):
        learner.set_classnames(["x", "y"])


def test_partial_phrase_init_keeps_remaining_words_fixed(tiny_backbone):
    """MaPLe's rule: n_ctx=2 with 'a photo of a' learns 'a photo' and keeps 'of a' as fixed words."""
    encoder = PromptedTextEncoder(tiny_backbone.model)
    learner = TextPromptLearner(encoder, tiny_backbone.tokenizer, ["cat"], n_ctx=2, init="a photo of a", deep_depth=2)
    assert tuple(learner.ctx.shape) == (2, 64) and tuple(learner.deep.shape) == (1, 2, 64)
    with torch.no_grad():
        plain = encoder.encode_ids(tiny_backbone.tokenize(["a photo of a cat."]))
        assert torch.allclose(learner.encode(normalize=False, deep=torch.empty(0, 2, 64)), plain, atol=1e-5)


def test_prompt_learner_errors(tiny_backbone):
    encoder = PromptedTextEncoder(tiny_backbone.model)
    with pytest.raises(ValueError, match="has 4 tokens but n_ctx=8"):
        TextPromptLearner(encoder, tiny_backbone.tokenizer, ["cat"], n_ctx=8, init="a photo of a")
    with pytest.raises(ValueError, match="not one of end, middle, front"):
        TextPromptLearner(encoder, tiny_backbone.tokenizer, ["cat"], position="start")
    with pytest.raises(ValueError, match="between 1 and the 2 text blocks"):
        TextPromptLearner(encoder, tiny_backbone.tokenizer, ["cat"], deep_depth=3)


def test_set_classnames_rebuilds_buffers_only(tiny_backbone):
    encoder = PromptedTextEncoder(tiny_backbone.model)
    learner = TextPromptLearner(encoder, tiny_backbone.tokenizer, ["cat", "dog"], n_ctx=4, init=None)
    before = learner.ctx.detach().clone()
    learner.set_classnames(["red star", "blue ring", "green cross"])
    assert learner()[0].shape[0] == 3 and torch.equal(learner.ctx, before)
    assert set(learner.state_dict()) == {"ctx"}  # token buffers are never saved


def test_batched_context_equals_per_sample(tiny_backbone):
    encoder = PromptedTextEncoder(tiny_backbone.model)
    learner = TextPromptLearner(encoder, tiny_backbone.tokenizer, ["cat", "dog", "red star"], init="a photo of a")
    contexts = learner.ctx.detach().unsqueeze(0) + torch.randn(2, 4, 64) * 0.05
    batched = learner.build(contexts, batched=True)
    assert batched.shape == (2, 3, 77, 64)
    for b in range(2):
        assert torch.equal(batched[b], learner.build(contexts[b]))


def test_maple_coupling_maps_text_to_vision_prompts(tiny_backbone, wide_backbone):
    coupling = MultimodalCoupling(depth=3, text_width=64, vision_width=96)
    ctx, deep = torch.randn(2, 64), torch.randn(2, 2, 64)
    layers = coupling(ctx, deep)
    assert [tuple(t.shape) for t in layers] == [(2, 96)] * 3
    assert torch.allclose(layers[1], coupling.layers[1](deep[0]))
    with pytest.raises(ValueError, match="coupling has 3 layers but got 2"):
        coupling(ctx, deep[:1])


def test_export_friendly_attention_equals_open_clip_and_leaves_the_original_alone(tiny_backbone):
    """The ONNX export's batch-first attention holds the same weights and gives the same image features; calls it
    does not cover (a mask, cross-attention, weights asked for) go to the original module."""
    from promptkd.backbones.onnx_attention import BatchFirstSelfAttention, export_friendly

    visual = tiny_backbone.model.visual
    friendly, swapped = export_friendly(visual)
    blocks = friendly.transformer.resblocks
    assert swapped == len(blocks) and all(isinstance(b.attn, BatchFirstSelfAttention) for b in blocks)
    assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in visual.transformer.resblocks)
    images = torch.randn(
        3, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(friendly(images), visual(images), rtol=0, atol=1e-5)
        attn, x = blocks[0].attn, torch.randn(2, 5, blocks[0].attn.mha.embed_dim)
        mask = torch.zeros(5, 5, dtype=torch.bool)
        mask[0, 1] = True
        other = torch.randn(2, 4, x.shape[-1])
        for kwargs in ({"attn_mask": mask, "need_weights": False}, {"need_weights": True}):
            got, expected = attn(x, x, x, **kwargs), attn.mha(x, x, x, **kwargs)
            torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(attn(x, other, other)[0], attn.mha(x, other, other)[0], rtol=0, atol=0)
