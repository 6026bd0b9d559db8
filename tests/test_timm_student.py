"""Any timm image model as the distilled student: loading (tags offline, files, random), the KD step, checkpoints
that hold what trained, prediction and verified ONNX / TorchScript export; and LoRA / unfrozen blocks on a CLIP
student. Teacher: a zero-shot pkd-tiny-wide with weights in a file; timm students: timm's own tiny test models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from promptkd.backbones import BackboneError, load_backbone
from promptkd.backbones.timm_models import load_timm_backbone
from promptkd.checkpoints import load_checkpoint
from promptkd.distill import zero_shot_teacher
from promptkd.errors import PromptKDError
from promptkd.methods.base import Batch
from promptkd.methods.promptkd import PromptKD, PromptKDConfig
from promptkd.methods.promptkd_timm import TimmKD, TimmKDConfig

CLASSES = ["red star", "blue ring", "green cross", "yellow moon"]


@pytest.fixture(scope="module")
def teacher(wide_backbone, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide_backbone.model.state_dict().items()}, str(path))
    return zero_shot_teacher(load_backbone("pkd-tiny-wide", str(path)).freeze())


def timm_student(name="test_convnext3", pretrained="random", **kwargs):
    torch.manual_seed(0)
    return load_timm_backbone(f"timm:{name}", pretrained, image_size=32, **kwargs)


class Images(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], -1


def test_timm_names_tags_and_features_are_checked(tmp_path):
    with pytest.raises(BackboneError, match="Did you mean 'timm:resnet18'"):
        load_timm_backbone("timm:resnet_18", "random")
    with pytest.raises(BackboneError, match="not in the local cache, and promptkd does not download"):
        load_timm_backbone("timm:resnet18", "a1_in1k")
    with pytest.raises(BackboneError, match="Did you mean 'a1_in1k'"):
        load_timm_backbone("timm:resnet18", "a1_inlk")
    with pytest.raises(BackboneError, match="say which weights"):
        load_timm_backbone("timm:test_vit", None)
    with pytest.raises(BackboneError, match="does not return pooled features"):
        load_timm_backbone("timm:test_efficientnet", "random", image_size=32, kwargs={"global_pool": ""})
    student = timm_student("test_vit", kwargs={"patch_size": 4})
    assert student.embed_dim == 64 and student.preprocess.size == 32 and student.spec.options["kwargs"]
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in student.model.visual.state_dict().items()}, str(weights))
    again = load_timm_backbone("timm:test_vit", str(weights), image_size=32, kwargs={"patch_size": 4})
    x = torch.randn(2, 3, 32, 32)
    assert again.spec.source == "file" and torch.equal(again.model.visual.eval()(x), student.model.visual.eval()(x))
    with pytest.raises(BackboneError, match="does not fit this timm model"):
        load_timm_backbone("timm:test_vit", str(weights), image_size=32)  # patch 16: other shapes


def test_timm_student_distils_and_its_checkpoint_holds_every_weight(teacher, tmp_path):
    student = TimmKD(timm_student(), CLASSES, TimmKDConfig(), teacher=teacher)
    assert all(p.requires_grad for p in student.backbone.model.visual.parameters())
    losses = []
    for _ in range(8):
        out = student.training_step(Batch(Images(16).x, torch.full((16,), -1)))
        out.loss.backward()
        with torch.no_grad():
            for p in student.trainable_parameters():
                p -= 0.05 * p.grad
                p.grad = None
        losses.append(float(out.loss))
    assert losses[-1] < losses[0]
    path = student.save(tmp_path / "student")
    tensors, meta = load_checkpoint(path)
    assert meta["method"] == "promptkd_timm" and meta["backbone"]["model_name"] == "timm:test_convnext3"
    visual_keys = {f"student.{k}" for k in student.backbone.model.visual.state_dict()}
    assert visual_keys <= set(tensors)  # a student from random weights keeps them all
    teacher.compute_features(CLASSES).save(tmp_path / "features")
    reloaded = TimmKD.from_checkpoint(path, tmp_path / "features")
    student.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded.logits(Images(4).x), student.logits(Images(4).x), atol=1e-5)
    with pytest.raises(PromptKDError, match="every layer must train"):
        TimmKD(timm_student(), CLASSES, TimmKDConfig(train_layers="last:1"), teacher=teacher)
    with pytest.raises(ValueError, match="train_layers must be"):
        TimmKDConfig(train_layers="last:x")


def test_timm_student_last_groups_from_pretrained_weights(teacher, tmp_path):
    base = timm_student()
    weights = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in base.model.visual.state_dict().items()}, str(weights))
    backbone = load_timm_backbone("timm:test_convnext3", str(weights), image_size=32)
    student = TimmKD(backbone, CLASSES, TimmKDConfig(train_layers="last:1"), teacher=teacher)
    trained = [n for n, p in backbone.model.visual.named_parameters() if p.requires_grad]
    assert trained and len(trained) < len(list(backbone.model.visual.parameters()))
    state = student.trainable_state()
    assert {k[len("student.") :] for k in state if k.startswith("student.")} >= set(trained)
    student.train()
    assert student._frozen_modules and all(not m.training for m in student._frozen_modules)
    assert all(m.training for m in backbone.model.visual.modules() if any(p.requires_grad for p in m.parameters()))


def _distill_config(*argv):
    import argparse

    from promptkd.cli import distill

    parser = argparse.ArgumentParser()
    distill.add_arguments(parser)
    return distill.config_from_args(parser.parse_args(["--preset", "world", "--dataset", "shapes", *argv]))


def test_timm_student_config_keys_are_its_own():
    """--set method.train_layers reaches a timm student (the promptkd preset's keys alone refused it); a CLIP
    student's keys are refused for a timm student and the reverse, each naming the student it belongs to."""
    from promptkd.config import ConfigError

    timm = ["--student", "timm:test_convnext3", "--student-pretrained", "random"]
    for value in ("all", "last:2", "none"):
        config = _distill_config(*timm, "--set", f"method.train_layers={value}", "method.kd_weight=2")
        assert config.method_config["train_layers"] == value and config.method_config["kd_weight"] == 2
    with pytest.raises(ConfigError, match="train_layers must be"):
        _distill_config(*timm, "--set", "method.train_layers=last:x")
    with pytest.raises(ConfigError, match="method.lora_rank applies to CLIP students"):
        _distill_config(*timm, "--set", "method.lora_rank=4")
    with pytest.raises(ConfigError, match="method.train_layers applies to timm students"):
        _distill_config("--student-model", "pkd-tiny", "--set", "method.train_layers=all")
    assert _distill_config("--student-model", "pkd-tiny", "--set", "method.lora_rank=4").method_config["lora_rank"]


def test_timm_student_last_groups_keep_dropout_and_droppath_of_trained_stages_training(teacher, tmp_path):
    """With last:N, parameter-free modules (Dropout, DropPath) inside the trained stages train like the rest of
    them; those of frozen stages stay in eval mode."""
    from timm.layers import DropPath

    kwargs = {"drop_path_rate": 0.2, "drop_rate": 0.1}
    base = timm_student(kwargs=kwargs)
    weights = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in base.model.visual.state_dict().items()}, str(weights))
    backbone = load_timm_backbone("timm:test_convnext3", str(weights), image_size=32, kwargs=kwargs)
    student = TimmKD(backbone, CLASSES, TimmKDConfig(train_layers="last:2"), teacher=teacher).train()
    modules = dict(backbone.model.visual.named_modules())
    free = {n: m for n, m in modules.items() if isinstance(m, DropPath | torch.nn.Dropout)}
    inside = {n for n in free if n.startswith(("stages.3.", "head."))}  # the last two coarse groups
    assert inside and len(inside) < len(free)
    assert all(free[n].training for n in inside), [n for n in inside if not free[n].training]
    assert not any(m.training for n, m in free.items() if n not in inside)
    student.eval()
    assert not any(m.training for m in free.values())


@pytest.mark.slow
def test_timm_student_cli_predict_and_verified_exports(teacher, tmp_path):
    """distill --student timm:NAME on a folder, then predict, TorchScript and ONNX (onnxruntime equals torch)."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from promptkd.cli.main import main as cli
    from promptkd.deploy import ExportedStudent, load_for_inference

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    spec = teacher.method.backbone.spec
    argv = ["distill", "--teacher-model", "pkd-tiny-wide", "--teacher-pretrained", str(spec.pretrained)]
    argv += ["--student", "timm:test_vit", "--student-pretrained", "random", "--student-kwargs", "patch_size=4"]
    argv += ["--unlabeled-folder", str(folder), "--classnames", str(tmp_path / "classes.txt"), "--no-eval"]
    argv += ["--out", str(tmp_path / "run"), "--set", "train.epochs=2", "train.batch_size=4", "train.progress=false"]
    assert cli([*argv, "method.train_layers=all"]) == 0
    config = json.loads((tmp_path / "run" / "prompts.json").read_text())
    assert config["method"] == "promptkd_timm" and config["backbone"]["options"]["kwargs"] == {"patch_size": 4}
    assert cli(["predict", str(tmp_path / "run" / "prompts"), str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 13
    method = load_for_inference(tmp_path / "run" / "prompts")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = method.logits(x)
    assert cli(["export", str(tmp_path / "run" / "prompts"), "--out", str(tmp_path / "ts")]) == 0
    assert torch.allclose(ExportedStudent(tmp_path / "ts").logits(x), expected, atol=1e-4)
    assert cli(["export", str(tmp_path / "run" / "prompts"), "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    session = ort.InferenceSession(str(tmp_path / "onnx" / "student.onnx"))
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-4)
    assert oct((tmp_path / "onnx" / "export.json").stat().st_mode & 0o777) != "0o600"  # shareable files


def test_clip_student_with_lora_and_unfrozen_blocks(teacher, tiny_backbone, tmp_path):
    """LoRA (peft) on the attention and the last block unfrozen: trained and saved as student.*, folded into the
    weights for export (the deployable copy equals the method)."""
    from promptkd.backbones import load_backbone

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    for settings, marker in (({"lora_rank": 2}, "lora_"), ({"unfreeze_blocks": 1}, "resblocks.1.")):
        backbone = load_backbone("pkd-tiny", str(path))
        torch.manual_seed(0)
        student = PromptKD(backbone, CLASSES, PromptKDConfig(vision_depth=2, **settings), teacher=teacher)
        tuned = [n for n, p in backbone.model.visual.named_parameters() if p.requires_grad]
        assert tuned and all(marker in n or "ln_post" in n or n == "proj" for n in tuned), tuned
        out = student.training_step(Batch(Images(8).x, torch.full((8,), -1)))
        out.loss.backward()
        with torch.no_grad():
            for p in student.trainable_parameters():
                p -= 0.5 * p.grad
        saved = student.save(tmp_path / f"s{marker}")
        tensors, _ = load_checkpoint(saved)
        assert any(k.startswith("student.") and marker in k for k in tensors)
        student.eval()
        with torch.no_grad():
            x = Images(3).x
            assert torch.allclose(student.deployable()(x), student.logits(x), atol=1e-5)
            fresh = PromptKD(
                load_backbone("pkd-tiny", str(path)),
                CLASSES,
                PromptKDConfig(vision_depth=2, **settings),
                features=student.stored,
            )
            fresh.load(saved)
            assert torch.allclose(fresh.eval().logits(x), student.logits(x), atol=1e-6)
    with pytest.raises(ValueError, match="lora_rank and unfreeze_blocks"):
        PromptKDConfig(lora_rank=-1)
