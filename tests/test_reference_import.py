"""Import of checkpoints written by the public CoOp / MaPLe / PromptSRC / PromptKD code (Dassl format)."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from torch import nn

from promptkd.checkpoints import (
    CheckpointError,
    convert_reference_checkpoint,
    convert_reference_state_dict,
    load_checkpoint,
    load_trainable_state,
    read_reference_checkpoint,
)
from promptkd.prompts import PromptedTextEncoder, TextPromptLearner, VisualPrompts


def _fake_dassl_module():
    """A class from a module that will not be importable at load time, like Dassl's schedulers."""
    module = types.ModuleType("dassl_fake_lr_scheduler")

    class ConstantWarmupScheduler:
        def __init__(self):
            self.successor = {"T_max": 20}
            self.last_epoch = 19

    ConstantWarmupScheduler.__module__ = module.__name__
    ConstantWarmupScheduler.__qualname__ = "ConstantWarmupScheduler"
    module.ConstantWarmupScheduler = ConstantWarmupScheduler
    return module


def save_dassl(path, state_dict, epoch=20):
    module = _fake_dassl_module()
    sys.modules[module.__name__] = module
    try:
        torch.save(
            {
                "state_dict": state_dict,
                "epoch": epoch,
                "optimizer": {"state": {}, "param_groups": []},
                "scheduler": module.ConstantWarmupScheduler(),
                "val_result": 81.5,
            },
            path,
        )
    finally:
        del sys.modules[module.__name__]


def ivlp_teacher_state(backbone, n_cls=3, n_ctx=4, depth=2, promptsrc=True):
    g = torch.Generator().manual_seed(0)
    wt, wv = backbone.text_width, backbone.vision_width
    state = {
        "prompt_learner.ctx": torch.randn(n_ctx, wt, generator=g),
        "prompt_learner.token_prefix": torch.randn(n_cls, 1, wt, generator=g),
        "prompt_learner.token_suffix": torch.randn(n_cls, 72, wt, generator=g),
        "image_encoder.VPT": torch.randn(n_ctx, wv, generator=g),
        "image_encoder.conv1.weight": backbone.model.visual.conv1.weight.clone(),
        "text_encoder.ln_final.weight": backbone.model.ln_final.weight.clone(),
        "logit_scale": backbone.model.logit_scale.clone(),
    }
    for i in range(1, depth):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, wt, generator=g)
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(n_ctx, wv, generator=g)
    if promptsrc:
        state["prompt_learner.ZS_image_encoder.conv1.weight"] = backbone.model.visual.conv1.weight.clone()
    return state


def test_promptsrc_teacher_maps_every_prompt(tiny_backbone, tmp_path):
    state = ivlp_teacher_state(tiny_backbone)
    path = tmp_path / "model-best.pth.tar"
    save_dassl(path, state)
    out, report = convert_reference_state_dict(read_reference_checkpoint(path)[0], str(path))
    assert report.method == "promptsrc"
    assert torch.equal(out["text.ctx"], state["prompt_learner.ctx"])
    assert torch.equal(out["text.deep"][0], state["text_encoder.transformer.resblocks.1.VPT_shallow"])
    assert torch.equal(out["visual.prompts"][0], state["image_encoder.VPT"])
    assert torch.equal(out["visual.prompts"][1], state["image_encoder.transformer.resblocks.1.VPT_shallow"])
    assert sorted(report.ignored_buffers) == ["prompt_learner.token_prefix", "prompt_learner.token_suffix"]
    assert len(report.frozen_weights) == 4
    assert report.settings == {
        "n_ctx": 4,
        "class_specific": False,
        "text_width": 64,
        "text_depth": 2,
        "n_vision_tokens": 4,
        "vision_depth": 2,
        "vision_width": 64,
    }


def test_dassl_file_is_read_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"prompt_learner.ctx": torch.ones(2, 4)}, "scheduler": Evil()}, tmp_path / "x.pth")
    state, _ = read_reference_checkpoint(tmp_path / "x.pth")
    assert not marker.exists()
    assert torch.equal(state["prompt_learner.ctx"], torch.ones(2, 4))


def test_converted_teacher_loads_strictly_and_gives_same_text_features(tiny_backbone, tmp_path):
    state = ivlp_teacher_state(tiny_backbone)
    path = tmp_path / "model.pth.tar-20"
    save_dassl(path, state)
    classes = ["red star", "blue ring", "green cross"]
    written, _report = convert_reference_checkpoint(
        path, tmp_path / "teacher", backbone=tiny_backbone, classnames=classes
    )
    tensors, config = load_checkpoint(written)
    assert config["method"] == "promptsrc" and config["converted_from"]["epoch"] == 20
    assert config["backbone"]["model_name"] == "pkd-tiny" and config["classnames"] == classes

    encoder = PromptedTextEncoder(tiny_backbone.model)

    class IVLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.text = TextPromptLearner(
                encoder, tiny_backbone.tokenizer, classes, n_ctx=4, init="a photo of a", deep_depth=2
            )
            self.visual = VisualPrompts(4, 2, tiny_backbone.vision_width)

    learner = IVLP()
    load_trainable_state(learner, tensors, written)
    ids = tiny_backbone.tokenize([f"X X X X {c}." for c in classes])
    with torch.no_grad():
        embeddings = encoder.embed_tokens(ids)
        embeddings[:, 1:5] = state["prompt_learner.ctx"]
        expected = encoder(embeddings, ids, [state["text_encoder.transformer.resblocks.1.VPT_shallow"]])
        assert torch.allclose(learner.text.encode(normalize=False), expected, atol=1e-5)


def test_maple_coop_cocoop_and_promptkd_student(tiny_backbone):
    wt, wv = 64, 64
    maple = {
        "prompt_learner.ctx": torch.randn(2, wt),
        "prompt_learner.proj.weight": torch.randn(wv, wt),
        "prompt_learner.proj.bias": torch.randn(wv),
        "prompt_learner.compound_prompts_text.0": torch.randn(2, wt),
        "prompt_learner.compound_prompt_projections.0.weight": torch.randn(wv, wt),
        "prompt_learner.compound_prompt_projections.0.bias": torch.randn(wv),
    }
    out, report = convert_reference_state_dict(maple)
    assert report.method == "maple" and report.settings["depth"] == 2
    assert torch.equal(out["coupling.layers.1.weight"], maple["prompt_learner.compound_prompt_projections.0.weight"])
    assert torch.equal(out["text.deep"][0], maple["prompt_learner.compound_prompts_text.0"])

    coop = {
        "ctx": torch.randn(5, 16, wt),
        "token_prefix": torch.zeros(5, 1, wt),
        "token_suffix": torch.zeros(5, 60, wt),
    }
    out, report = convert_reference_state_dict(coop)
    assert report.method == "coop" and report.settings["class_specific"] and out["text.ctx"].shape == (5, 16, wt)

    cocoop = {
        "ctx": torch.randn(4, wt),
        "meta_net.linear1.weight": torch.randn(2, 32),
        "meta_net.linear1.bias": torch.randn(2),
        "meta_net.linear2.weight": torch.randn(wt, 2),
        "meta_net.linear2.bias": torch.randn(wt),
    }
    out, report = convert_reference_state_dict(cocoop)
    assert report.method == "cocoop" and set(out) == {
        "text.ctx",
        "meta_net.linear1.weight",
        "meta_net.linear1.bias",
        "meta_net.linear2.weight",
        "meta_net.linear2.bias",
    }

    student = {
        "image_encoder.VPT": torch.randn(4, wv),
        "image_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, wv),
        "image_encoder.conv1.weight": torch.randn(wv, 3, 8, 8),
        "VPT_image_trans.conv1.0.weight": torch.randn(48, 32, 1, 1),
        "VPT_image_trans.conv1.0.bias": torch.randn(48),
        "VPT_image_trans.conv1.1.weight": torch.randn(48),
        "VPT_image_trans.conv1.1.bias": torch.randn(48),
        "VPT_image_trans.conv1.1.running_mean": torch.randn(48),
        "VPT_image_trans.conv1.1.running_var": torch.rand(48),
        "VPT_image_trans.conv1.1.num_batches_tracked": torch.tensor(100),
        "VPT_image_trans.conv1.3.weight": torch.randn(48, 48, 1, 1),
        "VPT_image_trans.conv1.3.bias": torch.randn(48),
    }
    out, report = convert_reference_state_dict(student)
    assert report.method == "promptkd"
    assert out["projector.fc1.weight"].shape == (48, 32)
    assert torch.equal(out["projector.fc1.weight"], student["VPT_image_trans.conv1.0.weight"].flatten(1))
    assert torch.equal(out["projector.bn.running_var"], student["VPT_image_trans.conv1.1.running_var"])
    assert out["visual.prompts"].shape == (2, 4, wv)
    assert report.settings["projector_in"] == 32 and report.settings["projector_out"] == 48


def test_checkpoint_for_another_backbone_is_refused(wide_backbone, tiny_backbone, tmp_path):
    path = tmp_path / "wide-teacher.pth.tar"
    save_dassl(path, ivlp_teacher_state(wide_backbone, depth=3))
    with pytest.raises(CheckpointError) as info:
        convert_reference_checkpoint(path, tmp_path / "out", backbone=tiny_backbone)
    message = str(info.value)
    assert str(path) in message and "does not fit backbone pkd-tiny" in message
    assert "text context width 96 (backbone text width 64)" in message
    assert "visual prompt depth 3 (backbone has 2 blocks)" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_stored_frozen_weights_must_match_backbone(tiny_backbone, wide_backbone, tmp_path):
    state = ivlp_teacher_state(tiny_backbone)
    state["image_encoder.conv1.weight"] = wide_backbone.model.visual.conv1.weight.clone()
    path = tmp_path / "t.pth.tar"
    save_dassl(path, state)
    with pytest.raises(
        CheckpointError, match=r"stored CLIP weight image_encoder.conv1.weight has shape \[96, 3, 4, 4\]"
    ):
        convert_reference_checkpoint(path, tmp_path / "out", backbone=tiny_backbone)


def test_unknown_keys_and_gaps_are_errors():
    with pytest.raises(CheckpointError, match="not known reference prompt keys: prompt_learner.mystery"):
        convert_reference_state_dict(
            {"prompt_learner.ctx": torch.zeros(2, 4), "prompt_learner.mystery": torch.zeros(1)}
        )
    gap = {
        "image_encoder.VPT": torch.zeros(2, 4),
        "image_encoder.transformer.resblocks.2.VPT_shallow": torch.zeros(2, 4),
    }
    with pytest.raises(CheckpointError, match=r"visual prompts exist for layers \[0, 2\]"):
        convert_reference_state_dict(gap)
    with pytest.raises(CheckpointError, match="no prompt tensors found"):
        convert_reference_state_dict({"image_encoder.conv1.weight": torch.zeros(1)})


def test_truncated_reference_file(tiny_backbone, tmp_path):
    path = tmp_path / "model.pth.tar-5"
    save_dassl(path, ivlp_teacher_state(tiny_backbone))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot be read as a Dassl/torch checkpoint"):
        read_reference_checkpoint(path)


# --- a converted MaPLe checkpoint as the base of test-time alignment ---------------------------------------------


def token_buffers(backbone, classes, n_ctx, ctx_init="a photo of a"):
    """The reference prompt learners' SOS / after-context buffers of "<CTX_INIT or X X> <class>.", in fp16."""
    prefix = ctx_init or " ".join(["X"] * n_ctx)
    with torch.no_grad():
        tokens = backbone.model.token_embedding(backbone.tokenize([f"{prefix} {name}." for name in classes])).half()
    return {"prompt_learner.token_prefix": tokens[:, :1], "prompt_learner.token_suffix": tokens[:, 1 + n_ctx :]}


def maple_reference_state(backbone, classes, n_ctx=2, depth=2, ctx_init="a photo of a"):
    """A MaPLe checkpoint as the reference trainer saves it: the whole CustomCLIP in fp16 (its configs' PREC),
    ``prompt_learner.*`` prompts and coupling maps, the token buffers of "<CTX_INIT> <class>." (or "X X <class>."
    for random context) of the training classes, frozen CLIP weights."""
    g = torch.Generator().manual_seed(7)
    wt, wv = backbone.text_width, backbone.vision_width

    def rand(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).half()

    state = {
        "prompt_learner.ctx": rand(n_ctx, wt, std=0.02),
        **token_buffers(backbone, classes, n_ctx, ctx_init),
        "prompt_learner.proj.weight": rand(wv, wt),
        "prompt_learner.proj.bias": rand(wv),
        "image_encoder.conv1.weight": backbone.model.visual.conv1.weight.detach().half(),
        "text_encoder.positional_embedding": backbone.model.positional_embedding.detach().half(),
        "text_encoder.ln_final.weight": backbone.model.ln_final.weight.detach().half(),
        "logit_scale": backbone.model.logit_scale.detach().half(),
    }
    for k in range(depth - 1):
        state[f"prompt_learner.compound_prompts_text.{k}"] = rand(n_ctx, wt, std=0.02)
        state[f"prompt_learner.compound_prompt_projections.{k}.weight"] = rand(wv, wt)
        state[f"prompt_learner.compound_prompt_projections.{k}.bias"] = rand(wv)
    return state


def tiny_weights(backbone, folder):
    """The fixture backbone's weights as a file, so that the CLI loads this very backbone (pkd-tiny is random)."""
    from safetensors.torch import save_file

    path = folder / "pkd-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    return str(path)


def _toy_images(root, classes, per_class=2, size=40):
    """A split-file dataset of flat-coloured images with a few random pixels (train and test splits)."""
    import json
    import random

    from PIL import Image

    rng = random.Random(0)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        for which in ("train", "val", "test"):
            for j in range(per_class):
                rel = f"{label}/{which}_{j}.png"
                (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                image = Image.new("RGB", (size, size), tuple((label * 71 + 50 * c) % 256 for c in range(3)))
                for _ in range(20):
                    image.putpixel((rng.randrange(size), rng.randrange(size)), (rng.randrange(256),) * 3)
                image.save(root / "images" / rel)
                split[which].append([rel, label, name])
    (root / "split_zhou_Toy.json").write_text(json.dumps(split))
    return root


@pytest.mark.slow
def test_converted_maple_checkpoint_is_a_promptalign_and_promptsync_base(tiny_backbone, tmp_path, capsys):
    """Dassl MaPLe file -> `promptkd convert` -> `tta-stats` -> `tta --method promptalign / promptsync`."""
    from promptkd.cli.main import main
    from promptkd.tta import build_model

    classes = ["red star", "blue ring", "green cross"]
    reference = tmp_path / "MultiModalPromptLearner" / "model.pth.tar-2"
    reference.parent.mkdir()
    state = maple_reference_state(tiny_backbone, classes)
    save_dassl(reference, state, epoch=2)
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    base = tmp_path / "maple"
    argv = ["convert", str(reference), "--out", str(base), "--model", "pkd-tiny", "--classnames"]
    argv += [str(tmp_path / "classes.txt"), "--pretrained", tiny_weights(tiny_backbone, tmp_path)]
    assert main(argv) == 0
    assert "detected maple checkpoint (epoch 2)" in capsys.readouterr().out

    model, description = build_model(classes, checkpoint=str(base))
    assert "maple" in description
    assert torch.equal(model.base["ctx"], state["prompt_learner.ctx"].float())
    assert torch.equal(model.base["deep"][0], state["prompt_learner.compound_prompts_text.0"].float())
    assert torch.equal(model.base["coupling_weight"][0], state["prompt_learner.proj.weight"].float())
    assert model.learner.prefix_text == "a photo of a"  # the reference's CTX_INIT: 2 learnt tokens, then "of a"

    toy = _toy_images(tmp_path / "toy", classes)
    stats, protos = tmp_path / "stats", tmp_path / "protos"
    argv = ["tta-stats", "--dataset", str(toy), "--base", str(base), "--layers", "0", "1", "--augmented", "1"]
    assert main([*argv, "--stats", str(stats), "--prototypes", str(protos)]) == 0
    common = ["--datasets", str(toy), "--base", str(base), "--no-progress", "--set", "method.n_views=4"]
    out = tmp_path / "runs"
    assert main(["tta", "--method", "promptalign", *common, "--stats", str(stats), "--out", str(out)]) == 0
    assert main(["tta", "--method", "promptsync", *common, "--prototypes", str(protos), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "promptalign toy: acc" in printed and "promptsync toy: acc" in printed


def test_converted_checkpoints_load_as_their_method(tiny_backbone, tmp_path):
    """Each converted record rebuilds its method through the ordinary loader (the config keys it writes are the
    method's own), with the file's prompts in place."""
    from promptkd.deploy import load_for_inference

    wt, wv = tiny_backbone.text_width, tiny_backbone.vision_width
    classes = ["red star", "blue ring", "green cross"]
    states = {
        "promptsrc": ivlp_teacher_state(tiny_backbone),
        "ivlp": ivlp_teacher_state(tiny_backbone, n_ctx=2, promptsrc=False) | token_buffers(tiny_backbone, classes, 2),
        "coop": {"ctx": torch.randn(3, 6, wt), "token_prefix": torch.zeros(3, 1, wt)},
        "vpt": {
            "image_encoder.VPT": torch.randn(5, wv),
            "image_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(5, wv),
        },
        "maple": maple_reference_state(tiny_backbone, classes, n_ctx=3),
    }
    for name, state in states.items():
        path = tmp_path / f"{name}.pth"
        save_dassl(path, state)
        written, report = convert_reference_checkpoint(
            path, tmp_path / name, backbone=tiny_backbone, classnames=classes
        )
        assert report.method == name
        method = load_for_inference(written)
        assert method.name == name
        tensors, _ = load_checkpoint(written)
        own = method.learner.state_dict()
        for key, value in tensors.items():
            assert torch.equal(own[key].float(), value.float()), (name, key)


def test_maple_file_trained_with_another_ctx_init_needs_it_named(tiny_backbone, tmp_path, capsys):
    """The token buffers tell which words follow the learnt tokens; a file trained with random context is refused
    under the assumed "a photo of a" (its prompts would be rebuilt with other text) and converts with --ctx-init."""
    from promptkd.cli.main import main
    from promptkd.tta import build_model

    classes = ["red star", "blue ring"]
    path = tmp_path / "model.pth.tar-2"
    save_dassl(path, maple_reference_state(tiny_backbone, classes, ctx_init=""))
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    argv = ["convert", str(path), "--model", "pkd-tiny", "--pretrained", tiny_weights(tiny_backbone, tmp_path)]
    argv += ["--classnames", str(tmp_path / "classes.txt"), "--out"]
    assert main([*argv, str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "do not continue with 'of a' after the 2 learnt tokens" in err and "--ctx-init" in err
    assert not (tmp_path / "a.safetensors").exists()
    assert main([*argv, str(tmp_path / "b"), "--ctx-init", "random"]) == 0
    model, _ = build_model(classes, checkpoint=str(tmp_path / "b"))
    assert model.learner.prefix_text == "X X"
    assert main([*argv, str(tmp_path / "c"), "--ctx-init", "a"]) == 2
    assert "has 1 tokens, fewer than the file's 2 context tokens" in capsys.readouterr().err
    coop = tmp_path / "coop.pth"
    save_dassl(coop, {"ctx": torch.randn(4, tiny_backbone.text_width)})
    assert main(["convert", str(coop), "--out", str(tmp_path / "d"), "--ctx-init", "random"]) == 2
    assert "--ctx-init applies to MaPLe, IVLP and PromptSRC files" in capsys.readouterr().err
