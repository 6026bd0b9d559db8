"""PromptKD: teacher loading and stored features, the distillation loss, the student, data sources and the CLI.

Teacher: pkd-tiny-wide (3 blocks, embed 48); student: pkd-tiny (2 blocks, embed 32); random weights saved to files
so a teacher can be rebuilt from its checkpoint's recorded backbone.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

from promptkd.backbones import Backbone, BackboneSpec, PreprocessInfo, load_backbone
from promptkd.checkpoints import convert_reference_checkpoint, convert_reference_state_dict, load_checkpoint
from promptkd.data.items import DataError, DatasetSplits, Datum
from promptkd.distill import (
    TeacherError,
    TeacherFeatures,
    TeacherInput,
    cap_items,
    from_folder,
    from_splits,
    load_teacher,
    zero_shot_teacher,
)
from promptkd.engine import TrainConfig, Trainer
from promptkd.methods import get_method
from promptkd.methods.base import Batch, config_from
from promptkd.methods.prompted import PromptConfigError
from promptkd.methods.promptkd import PromptKD, PromptKDConfig, kd_loss
from test_reference_import import ivlp_teacher_state, save_dassl

CLASSES = ["red star", "blue ring", "green cross", "yellow moon"]


# --- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_backbone(wide_backbone, tmp_path_factory):
    """pkd-tiny-wide with its random weights in a file, so checkpoints record a backbone that can be rebuilt."""
    path = tmp_path_factory.mktemp("weights") / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide_backbone.model.state_dict().items()}, str(path))
    return load_backbone("pkd-tiny-wide", str(path)).freeze()


@pytest.fixture(scope="module")
def teacher_ckpt(teacher_backbone, tmp_path_factory):
    """A PromptSRC teacher (4+4 tokens, depth 2/2) with random prompts, saved as a promptkd checkpoint."""
    cls = get_method("promptsrc")
    torch.manual_seed(3)
    method = cls(teacher_backbone, CLASSES[:2], config_from(cls, {"text_depth": 2, "vision_depth": 2}))
    with torch.no_grad():
        for p in method.learner.parameters():
            p.normal_(0, 0.5)
    return method.save(tmp_path_factory.mktemp("teacher") / "prompts")


@pytest.fixture(scope="module")
def teacher(teacher_ckpt):
    return load_teacher(teacher_ckpt, classnames=CLASSES)


def make_student(backbone, teacher, classes=CLASSES, **cfg) -> PromptKD:
    torch.manual_seed(0)
    return PromptKD(backbone, list(classes), PromptKDConfig(vision_depth=2, **cfg), teacher=teacher)


def images(n=8, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Tensors(torch.utils.data.Dataset):
    def __init__(self, x, labels):
        self.x, self.labels = x, labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.05 * torch.randn(self.x[i].shape), int(self.labels[i])


# --- the loss ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("normalization", ["batch", "logits"])
def test_kd_loss_equals_hand_computation(tau, normalization):
    zs = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zt = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    total = 0.0
    for b in range(2):
        es = [math.exp(v / tau) for v in zs[b].tolist()]
        et = [math.exp(v / tau) for v in zt[b].tolist()]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(t * (math.log(t) - math.log(s)) for t, s in zip(pt, ps))
    expected = 7.0 * tau**2 * total / (2 if normalization == "batch" else 6)
    got = kd_loss(zs, zt, tau, normalization, weight=7.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


# --- teacher and stored features ------------------------------------------------------------------------------------
def test_teacher_is_frozen_and_features_are_computed_after_loading(teacher, teacher_ckpt):
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    native_tensors, _ = load_checkpoint(teacher_ckpt)
    assert torch.equal(teacher.method.learner.text.ctx, native_tensors["text.ctx"])  # loaded before features
    stored = teacher.compute_features(CLASSES)
    assert stored.features.shape == (4, 48) and torch.allclose(stored.features.norm(dim=-1), torch.ones(4))
    assert stored.teacher["checkpoint_sha256"] and stored.teacher["method"] == "promptsrc"
    unloaded = type(teacher)(teacher.method, teacher.identity, loaded=False)
    with pytest.raises(TeacherError, match="issue #33"):
        unloaded.compute_features(CLASSES)


def test_features_file_refuses_other_classes_and_other_teacher(teacher, tmp_path, tiny_backbone):
    stored = teacher.compute_features(CLASSES)
    stored.save(tmp_path / "features")
    loaded = TeacherFeatures.load(tmp_path / "features.safetensors")
    assert torch.equal(loaded.features, stored.features) and loaded.classnames == CLASSES
    loaded.check(classnames=CLASSES, teacher=teacher.identity)
    with pytest.raises(TeacherError, match="'red star'.*'cat'"):
        loaded.check(classnames=["cat", "dog"])
    other = {**teacher.identity, "checkpoint_sha256": "0" * 64}
    with pytest.raises(TeacherError, match="prompts sha256 3|prompts sha256"):
        loaded.check(teacher=other)
    with pytest.raises(TeacherError, match="no stored teacher features for 1 classes"):
        PromptKD(tiny_backbone, ["cat"], PromptKDConfig(vision_depth=2), features=loaded)
    impostor = type(teacher)(teacher.method, other, loaded=True)
    with pytest.raises(TeacherError, match="this run's teacher"):
        PromptKD(tiny_backbone, CLASSES, PromptKDConfig(vision_depth=2), features=loaded, teacher=impostor)
    (tmp_path / "features.json").write_text(json.dumps({"format": "promptkd-checkpoint"}))
    with pytest.raises(TeacherError, match="not a teacher-features file"):
        TeacherFeatures.load(tmp_path / "features")


def test_teacher_checkpoint_that_does_not_fit_its_backbone(teacher_ckpt, tiny_backbone):
    with pytest.raises(TeacherError, match="does not fit the teacher backbone pkd-tiny"):
        load_teacher(teacher_ckpt, backbone=tiny_backbone)


def test_zero_shot_teacher_and_refused_methods(wide_backbone, tmp_path):
    zs = zero_shot_teacher(wide_backbone)
    stored = zs.compute_features(CLASSES)
    x = images()
    expected = zs.method.logits(x)  # ZeroShotCLIP's own classifier for the same classes
    assert torch.allclose(zs.logits(x, stored.features, stored.logit_scale), expected, atol=1e-4)
    saved = zs.method.save(tmp_path / "zeroshot")  # what `promptkd train --method zeroshot` leaves
    from_file = load_teacher(saved, backbone=wide_backbone, classnames=CLASSES)
    assert torch.allclose(from_file.compute_features(CLASSES).features, stored.features, atol=1e-6)
    cocoop = get_method("cocoop")(wide_backbone, CLASSES)
    with pytest.raises(TeacherError, match="depend on each image"):
        type(zs)(cocoop, {}, loaded=True)


def test_converted_reference_teacher_equals_native(teacher_backbone, tmp_path):
    classes = CLASSES[:3]
    state = ivlp_teacher_state(teacher_backbone, n_cls=3, n_ctx=4, depth=2)
    save_dassl(tmp_path / "model.pth.tar-20", state)
    converted, _ = convert_reference_checkpoint(
        tmp_path / "model.pth.tar-20", tmp_path / "converted", backbone=teacher_backbone, classnames=classes
    )
    cls = get_method("promptsrc")
    native = cls(teacher_backbone, classes, config_from(cls, {"text_depth": 2, "vision_depth": 2}))
    with torch.no_grad():
        native.learner.text.ctx.copy_(state["prompt_learner.ctx"])
        native.learner.text.deep[0].copy_(state["text_encoder.transformer.resblocks.1.VPT_shallow"])
        native.learner.visual.prompts[0].copy_(state["image_encoder.VPT"])
        native.learner.visual.prompts[1].copy_(state["image_encoder.transformer.resblocks.1.VPT_shallow"])
    native_path = native.save(tmp_path / "native")
    a, b = load_teacher(converted, classnames=classes), load_teacher(native_path, classnames=classes)
    assert a.method.name == "promptsrc" and a.identity["backbone"] == b.identity["backbone"]
    fa, fb = a.compute_features(classes), b.compute_features(classes)
    assert torch.allclose(fa.features, fb.features, atol=1e-6)
    x = images(4)
    assert torch.allclose(a.logits(x, fa.features, fa.logit_scale), b.logits(x, fb.features, fb.logit_scale), atol=1e-5)
    assert torch.allclose(b.logits(x, fb.features, fb.logit_scale), native.logits(x), atol=1e-4)


# --- the student ------------------------------------------------------------------------------------------------------
def test_text_encoders_never_run_in_training_or_inference(teacher, tiny_backbone, monkeypatch):
    method = make_student(tiny_backbone, teacher)  # computing the stored features runs the teacher's text tower once

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder ran")

    for bb in (tiny_backbone, teacher.backbone):
        monkeypatch.setattr(bb.text_tower.token_embedding, "forward", refuse)
        monkeypatch.setattr(bb.text_tower.transformer, "forward", refuse)
        monkeypatch.setattr(bb.model, "encode_text", refuse)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    method.train()
    for _ in range(2):
        loss = method.training_step(Batch(images())).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    method.eval()
    with torch.no_grad():
        method.logits(images())
        method.set_classnames(CLASSES[2:])
        method.logits(images())
        method.deployable()(images())


def test_labels_are_never_read(teacher, tiny_backbone, tmp_path):
    class NoLabels(Batch):
        @property
        def labels(self):
            raise AssertionError("labels read")

        @labels.setter
        def labels(self, value):
            pass

    method = make_student(tiny_backbone, teacher)
    method.train()
    assert method.training_step(NoLabels(images())).loss.isfinite()
    assert not PromptKD.uses_labels

    x = images(12, seed=1)
    states = []
    for i, labels in enumerate([torch.arange(12) % 4, torch.randint(-5000, 5000, (12,))]):
        method = make_student(tiny_backbone, teacher)
        cfg = TrainConfig(epochs=2, batch_size=4, lr=0.05, seed=3, progress=False, log_every=1)
        Trainer(method, cfg, tmp_path / str(i)).fit(Tensors(x, labels))
        states.append(method.trainable_state())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_distillation_lowers_the_kd_loss_also_under_bf16(teacher, tiny_backbone):
    method = make_student(tiny_backbone, teacher)
    assert set(method.trainable_state()) == {
        "visual.prompts",
        "projector.fc1.weight",
        "projector.fc1.bias",
        "projector.bn.weight",
        "projector.bn.bias",
        "projector.bn.running_mean",
        "projector.bn.running_var",
        "projector.bn.num_batches_tracked",
        "projector.fc2.weight",
        "projector.fc2.bias",
    }
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.2, momentum=0.9)
    method.train()
    x = images(16, seed=2)
    losses = []
    for _ in range(8):
        loss = method.training_step(Batch(x)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(Batch(x))
    assert out.loss.dtype == torch.float32 and out.loss.isfinite()
    out.loss.backward()


def test_depth_beyond_student_blocks_and_linear_projector(teacher, tiny_backbone):
    with pytest.raises(PromptConfigError, match="vision_depth=9 .* only 2 blocks"):
        PromptKD(tiny_backbone, CLASSES, PromptKDConfig(), teacher=teacher)
    linear = make_student(tiny_backbone, teacher, projector="linear")
    assert sorted(k for k in linear.trainable_state() if k.startswith("projector")) == [
        "projector.fc1.bias",
        "projector.fc1.weight",
    ]


def test_reference_student_state_dict_gives_reference_logits(teacher, tiny_backbone):
    method = make_student(tiny_backbone, teacher)
    ds, dt, width, g = 32, 48, tiny_backbone.vision_width, torch.Generator().manual_seed(5)
    ref = {
        "image_encoder.VPT": torch.randn(4, width, generator=g),
        "image_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, width, generator=g),
        "VPT_image_trans.conv1.0.weight": torch.randn(dt, ds, 1, 1, generator=g) * 0.2,
        "VPT_image_trans.conv1.0.bias": torch.randn(dt, generator=g),
        "VPT_image_trans.conv1.1.weight": torch.rand(dt, generator=g) + 0.5,
        "VPT_image_trans.conv1.1.bias": torch.randn(dt, generator=g),
        "VPT_image_trans.conv1.1.running_mean": torch.randn(dt, generator=g),
        "VPT_image_trans.conv1.1.running_var": torch.rand(dt, generator=g) + 0.5,
        "VPT_image_trans.conv1.1.num_batches_tracked": torch.tensor(100),
        "VPT_image_trans.conv1.3.weight": torch.randn(dt, dt, 1, 1, generator=g) * 0.2,
        "VPT_image_trans.conv1.3.bias": torch.randn(dt, generator=g),
    }
    tensors, report = convert_reference_state_dict(ref)
    assert report.method == "promptkd"
    method.load_trainable(tensors, "reference")
    method.eval()
    x = images(3)
    with torch.no_grad():
        prompts = torch.stack([ref["image_encoder.VPT"], ref["image_encoder.transformer.resblocks.1.VPT_shallow"]])
        g_x = method.image_encoder(x, prompts)
        h = g_x.view(3, ds, 1, 1)  # the reference's Feature_Trans_Module_two_layer on [B, d, 1, 1]
        h = F.conv2d(h, ref["VPT_image_trans.conv1.0.weight"], ref["VPT_image_trans.conv1.0.bias"])
        h = F.batch_norm(
            h,
            ref["VPT_image_trans.conv1.1.running_mean"],
            ref["VPT_image_trans.conv1.1.running_var"],
            ref["VPT_image_trans.conv1.1.weight"],
            ref["VPT_image_trans.conv1.1.bias"],
            training=False,
        )
        h = F.conv2d(F.relu(h), ref["VPT_image_trans.conv1.3.weight"], ref["VPT_image_trans.conv1.3.bias"])
        feature = F.normalize(h.flatten(1), dim=-1)
        expected = method.stored.logit_scale * feature @ method.text_features.t()
        assert torch.allclose(method.logits(x), expected, atol=1e-4)
        assert torch.allclose(method.deployable()(x), expected, atol=1e-4)


# --- preprocessing bridge ---------------------------------------------------------------------------------------------
def test_teacher_input_conversion_for_other_size_and_stats(teacher, tiny_backbone):
    from promptkd.data.transforms import build_transform

    student_pre = PreprocessInfo(48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    bridge = TeacherInput(student_pre, teacher.preprocess)
    assert not bridge.identity and "resized to 32 px" in bridge.describe()
    ramp = torch.linspace(0, 255, 96).round().to(torch.uint8)
    pil = Image.fromarray(torch.stack([ramp.view(1, -1).expand(96, -1)] * 3, dim=-1).numpy())
    converted = bridge(build_transform(student_pre)(pil).unsqueeze(0))
    direct = build_transform(teacher.preprocess)(pil).unsqueeze(0)
    assert converted.shape == direct.shape == (1, 3, 32, 32)
    assert (converted - direct).abs().mean() < 0.05
    assert TeacherInput(teacher.preprocess, teacher.preprocess).identity
    with pytest.raises(TeacherError, match="1 channels"):
        TeacherInput(PreprocessInfo(32, (0.5,), (0.5,)), teacher.preprocess)

    model = open_clip.create_model("pkd-tiny", force_image_size=48)
    spec = BackboneSpec("pkd-tiny", source="random", quick_gelu=True)
    student = Backbone(model, tiny_backbone.tokenizer, spec, student_pre).freeze()
    method = make_student(student, teacher)
    method.train()
    out = method.training_step(Batch(images(4, size=48)))
    assert out.loss.isfinite() and method.teacher_logits(images(4, size=48)).shape == (4, 4)


# --- inference without the teacher ------------------------------------------------------------------------------------
def test_student_from_checkpoint_needs_only_features(teacher, tiny_backbone, tmp_path):
    method = make_student(tiny_backbone, teacher)
    method.train()
    method.training_step(Batch(images())).loss.backward()
    method.eval()
    ckpt = method.save(tmp_path / "prompts")
    method.stored.save(tmp_path / "teacher_features")
    restored = PromptKD.from_checkpoint(ckpt, tmp_path / "teacher_features", backbone=tiny_backbone)
    assert restored.teacher is None
    x = images(5)
    with torch.no_grad():
        assert torch.equal(restored.logits(x), method.logits(x))
        beside = PromptKD.from_checkpoint(ckpt, backbone=tiny_backbone)  # teacher_features.* next to the checkpoint
        assert torch.equal(beside.logits(x), method.logits(x))
        traced = torch.jit.trace(restored.deployable(), x, check_trace=False)
        assert torch.allclose(traced(x), method.logits(x), atol=1e-5)
    other = TeacherFeatures(method.stored.features, 100.0, CLASSES, {**teacher.identity, "method": "coop"})
    with pytest.raises(TeacherError, match="coop on pkd-tiny-wide"):
        PromptKD.from_checkpoint(ckpt, other, backbone=tiny_backbone)


# --- data ----------------------------------------------------------------------------------------------------------
def _splits(root: Path) -> DatasetSplits:
    items = {which: [] for which in ("train", "val", "test")}
    counts = {"train": 3, "val": 1, "test": 2}
    for label, name in enumerate(CLASSES):
        for which, n in counts.items():
            for i in range(n):
                path = root / "images" / name.replace(" ", "_") / f"{which}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), (60 * label, 40 * i, 200 - 50 * label)).save(path)
                items[which].append(Datum(str(path), label, name))
    return DatasetSplits("toy", list(CLASSES), items["train"], items["val"], items["test"], root=str(root))


def test_unlabeled_sources_drop_labels_and_cap(tmp_path):
    splits = _splits(tmp_path / "toy")
    full = from_splits(splits)
    assert len(full.paths) == 12 and full.classnames == CLASSES and all(isinstance(p, str) for p in full.paths)
    inductive = from_splits(splits, mode="inductive")
    assert inductive.classnames == CLASSES[:2] and len(inductive.paths) == 6
    capped = from_splits(splits, max_per_class=2, seed=1)
    assert len(capped.paths) == 8 and capped.paths == from_splits(splits, max_per_class=2, seed=1).paths
    assert len(from_splits(splits, max_images=5).paths) == 5
    assert len(cap_items(splits.train, 1, 3)) == 3
    test_only = DatasetSplits("sketch", CLASSES, [], [], splits.test)
    with pytest.raises(DataError, match="test-only"):
        from_splits(test_only)
    assert "TEST images" in from_splits(test_only, split="test").notes[-1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        from_folder(tmp_path / "empty", CLASSES)
    assert len(from_folder(tmp_path / "toy", CLASSES, max_images=4).paths) == 4


def test_distill_streams_tar_shards_through_the_engine(teacher_ckpt, tmp_path):
    from engine_helpers import make_shards

    make_shards(tmp_path / "shards", n_shards=4, per_shard=6, bad={(2, 1)})
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    pattern = str(tmp_path / "shards" / "shard-{000..003}.tar")
    common = [
        "--teacher",
        str(teacher_ckpt),
        "--student-model",
        "pkd-tiny",
        "--student-pretrained",
        "random",
        "--unlabeled-shards",
        pattern,
    ]
    common += ["--classnames", str(tmp_path / "classes.txt"), "--lanes", "2", "--epoch-samples", "16"]
    sets = ["--set", "train.epochs=2", "train.batch_size=4", "train.progress=false", "method.vision_depth=2"]
    with pytest.raises(DataError, match=r"shard-002.tar:img_2_1.png: cannot decode image member"):
        _cli([*common, "--out", str(tmp_path / "strict"), *sets])
    assert _cli([*common, "--out", str(tmp_path / "run"), "--skip-bad", *sets]) == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["unlabeled"]["lanes"] == 2 and config["unlabeled"]["epoch_samples"] == 16
    assert config["skipped_members"] == [f"{tmp_path}/shards/shard-002.tar:img_2_1.png"]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["epoch"], last["step"], last["global_step"]) == (2, 4, 8)  # 16 samples per epoch / batch 4
    tensors, meta = load_checkpoint(tmp_path / "run" / "prompts")
    assert meta["method"] == "promptkd" and "visual.prompts" in tensors


# --- the CLI ---------------------------------------------------------------------------------------------------------
def _write_split_folder(root: Path) -> None:
    splits = _splits(root)
    payload = {
        which: [[str(Path(d.path).relative_to(root / "images")), d.label, d.classname] for d in splits.split(which)]
        for which in ("train", "val", "test")
    }
    (root / "split_zhou_Toy.json").write_text(json.dumps(payload))


def _cli(argv: list[str]) -> int:
    from promptkd.cli import distill

    parser = argparse.ArgumentParser()
    distill.add_arguments(parser)
    return distill.run(parser.parse_args(argv))


def test_distill_cli_end_to_end(teacher_ckpt, tmp_path, capsys):
    _write_split_folder(tmp_path / "toy")
    common = [
        "--teacher",
        str(teacher_ckpt),
        "--student-model",
        "pkd-tiny",
        "--student-pretrained",
        "random",
        "--dataset",
        str(tmp_path / "toy"),
    ]
    sets = ["--set", "train.epochs=1", "train.batch_size=4", "train.progress=false", "method.vision_depth=2"]
    assert _cli([*common, "--out", str(tmp_path / "run"), *sets]) == 0
    run = tmp_path / "run"
    stored = TeacherFeatures.load(run / "teacher_features")
    assert stored.classnames == CLASSES and stored.teacher["method"] == "promptsrc"
    results = sorted(run.glob("*.json"))
    by_half = {}
    for path in results:
        data = json.loads(path.read_text())
        if data.get("format") == "promptkd-result":
            by_half[data["subsample"]] = data
    assert set(by_half) == {"base", "new", "all"} and by_half["base"]["num_classes"] == 2
    assert by_half["all"]["num_classes"] == len(CLASSES) and by_half["all"]["protocol"] == "base2new"
    assert "hm" in by_half["base"] and "hm" not in by_half["all"]  # HM belongs to the halves
    assert by_half["base"]["mode"] == "transductive" and by_half["base"]["selection"]["on"] == "last_epoch"
    assert "HM" in capsys.readouterr().out
    _, meta = load_checkpoint(run / "prompts")
    assert meta["method"] == "promptkd" and meta["mode"] == "transductive"

    again = ["--teacher-features", str(run / "teacher_features.safetensors"), "--no-eval"]
    assert _cli([*common, "--out", str(tmp_path / "run2"), *again, *sets]) == 0
    other = TeacherFeatures(stored.features[:2], stored.logit_scale, ["cat", "dog"], stored.teacher)
    other.save(tmp_path / "other")
    with pytest.raises(TeacherError, match="'cat'"):
        _cli([*common, "--out", str(tmp_path / "run3"), "--teacher-features", str(tmp_path / "other"), *sets])


@pytest.mark.parametrize(
    "preset", ["vit_b16_c2_ep20_batch8_4+4ctx", "vit_b16_c2_ep20_batch8_4+4ctx_cross_datasets", "world"]
)
def test_presets_load_and_world_preset_fits_the_world_student(preset):
    from promptkd.config import load_preset

    data = load_preset("promptkd", preset)
    assert set(data) == {"method", "train"}
    config = config_from(PromptKD, data["method"])
    TrainConfig(**data["train"])
    if preset != "world":
        assert (config.kd_weight, config.kd_normalization, config.vision_depth) in (
            (1000.0, "logits", 9),
            (1000.0, "logits", 3),
        )
        return
    student = load_backbone("pkd-world-student")
    features = TeacherFeatures(F.normalize(torch.randn(3, 128), dim=-1), 100.0, ["a", "b", "c"], {"method": "zeroshot"})
    method = PromptKD(student, ["a", "b", "c"], config, features=features)
    assert method.logits(images(2)).shape == (2, 3) and method.learner.visual.prompts.shape[0] == 3


def test_imagenet_class_names_with_duplicates_round_trip(teacher_backbone, tmp_path, caplog):
    """ImageNet's 1,000 CLIP names repeat 'missile' and 'sunglasses': accepted (warned), rows by position, end to end
    through stored features, distillation on a folder and the student's predictions."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from promptkd.deploy import load_for_inference, predict

    names = list(IMAGENET_CLASSNAMES)
    assert len(names) == 1000 and len(set(names)) == 998
    teacher = zero_shot_teacher(teacher_backbone)
    with caplog.at_level("WARNING"):
        stored = teacher.compute_features(names)
    assert "'missile' (2x)" in caplog.text and "'sunglasses' (2x)" in caplog.text
    stored.save(tmp_path / "features")
    loaded = TeacherFeatures.load(tmp_path / "features")
    assert loaded.classnames == names and torch.equal(loaded.features, stored.features)
    first, second = (i for i, n in enumerate(names) if n == "missile")
    assert torch.equal(loaded.rows(names[first : second + 1])[-1], stored.features[second])  # k-th use -> k-th row
    assert torch.equal(loaded.rows(names[500:]), stored.features[500:])

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i in range(6):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    weights = str(teacher_backbone.spec.pretrained)
    argv = [
        "--teacher-model",
        "pkd-tiny-wide",
        "--teacher-pretrained",
        weights,
        "--student-model",
        "pkd-tiny",
        "--student-pretrained",
        "random",
    ]
    argv += ["--unlabeled-folder", str(folder), "--classnames", str(tmp_path / "classes.txt"), "--no-eval"]
    argv += ["--out", str(tmp_path / "run"), "--set", "train.epochs=1", "train.batch_size=3", "train.progress=false"]
    assert _cli([*argv, "method.vision_depth=2"]) == 0
    written = TeacherFeatures.load(tmp_path / "run" / "teacher_features")
    assert written.classnames == names and torch.allclose(written.features, stored.features, atol=1e-6)
    student = load_for_inference(tmp_path / "run" / "prompts")
    assert student.classnames == names
    predictions, skipped = predict(student, sorted(str(p) for p in folder.iterdir()), top_k=3, progress=False)
    assert len(predictions) == 6 and not skipped and all(p.classes[0] in names for p in predictions)


def test_features_extend_appends_new_classes_only(teacher, teacher_ckpt, teacher_backbone, tmp_path, capsys):
    """`promptkd features extend`: old rows bit-identical, new rows equal the teacher's, other teacher and names
    already stored refused; the student scores the extended list with no retraining and stays bound to its teacher."""
    from promptkd.cli.main import main as cli

    stored = teacher.compute_features(CLASSES[:2])
    stored.save(tmp_path / "features")
    (tmp_path / "new.txt").write_text("\n".join(CLASSES[2:]) + "\n")
    argv = ["features", "extend", str(tmp_path / "features"), "--teacher", str(teacher_ckpt)]
    assert cli([*argv, "--classes", str(tmp_path / "new.txt"), "--out", str(tmp_path / "extended")]) == 0
    extended = TeacherFeatures.load(tmp_path / "extended")
    assert extended.classnames == CLASSES and torch.equal(extended.features[:2], stored.features)
    assert torch.allclose(extended.features, teacher.compute_features(CLASSES).features, atol=1e-6)
    assert extended.extends(stored.classnames_sha256) and extended.extensions[0]["num_classes_before"] == 2

    again = ["features", "extend", str(tmp_path / "extended"), "--teacher", str(teacher_ckpt)]
    assert cli([*again, "--classes", str(tmp_path / "new.txt")]) == 2
    assert "stored already ('green cross'" in capsys.readouterr().err
    zero_shot = ["features", "extend", str(tmp_path / "features"), "--teacher-model", "pkd-tiny-wide"]
    zero_shot += ["--teacher-pretrained", str(teacher_backbone.spec.pretrained), "--classes", str(tmp_path / "new.txt")]
    assert cli(zero_shot) == 2 and "the teacher given is zeroshot" in capsys.readouterr().err

    # a student distilled on the first two classes scores all four with the extended file
    student = make_student(load_backbone("pkd-tiny"), teacher, CLASSES[:2])
    student_ckpt = student.save(tmp_path / "student")
    reloaded = PromptKD.from_checkpoint(student_ckpt, tmp_path / "extended.safetensors", backbone=student.backbone)
    assert reloaded.classnames == CLASSES and reloaded.logits(images(2)).shape == (2, 4)
    with torch.no_grad():
        assert torch.allclose(reloaded.logits(images(2))[:, :2], student.eval().logits(images(2)), atol=1e-5)

    # rows added by another teacher (a hand-edited file) are refused when loaded
    meta = json.loads((tmp_path / "extended.json").read_text())
    meta["extensions"][0]["teacher"] = {"method": "coop", "checkpoint_sha256": "0" * 64}
    (tmp_path / "extended.json").write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match="rows 2..3 were added by coop"):
        TeacherFeatures.load(tmp_path / "extended")


# --- the teacher's identity, by content -------------------------------------------------------------------------------
def test_the_same_teacher_named_another_way_is_the_same_teacher(teacher, teacher_ckpt, teacher_backbone, tmp_path):
    """A relative path, or the checkpoint and weights moved to another folder: same content, same identity, so
    stored features and a teacher cache made with one serve the other."""
    import os
    import shutil

    from promptkd.distill.cache import TeacherCache

    moved = tmp_path / "moved"
    moved.mkdir()
    for path in (teacher_ckpt, teacher_ckpt.with_suffix(".json"), Path(teacher_backbone.spec.pretrained)):
        shutil.copy(path, moved / path.name)
    here = os.getcwd()
    os.chdir(teacher_ckpt.parent)
    try:
        relative = load_teacher(teacher_ckpt.name, classnames=CLASSES)
    finally:
        os.chdir(here)
    weights = str(moved / Path(teacher_backbone.spec.pretrained).name)
    elsewhere = load_teacher(moved / teacher_ckpt.name, pretrained=weights, classnames=CLASSES)
    stored = teacher.compute_features(CLASSES)
    record = {"features_sha256": "f" * 64, "classnames_sha256": "c", "num_classes": 4, "logit_scale": 1.0}
    record["recipe"] = {"views": 1}
    TeacherCache(tmp_path / "cache", {**record, "teacher": teacher.identity})
    for other in (relative, elsewhere):
        TeacherCache(tmp_path / "cache", {**record, "teacher": other.identity})  # not refused
        stored.check(classnames=CLASSES, teacher=other.identity)
    from promptkd.distill.teacher import teacher_differences

    assert teacher_differences(teacher.identity, relative.identity) == []
    assert elsewhere.identity["about"]["checkpoint"] != teacher.identity["about"]["checkpoint"]  # kept, not compared


def test_two_random_teachers_are_two_teachers_and_the_message_names_what_differs(tmp_path):
    from promptkd.distill.teacher import same_teacher

    def random_teacher(seed):
        torch.manual_seed(seed)
        return zero_shot_teacher(load_backbone("pkd-tiny-wide"))

    a, b, again = random_teacher(5), random_teacher(6), random_teacher(5)
    assert not same_teacher(a.identity, b.identity) and same_teacher(a.identity, again.identity)
    stored = a.compute_features(CLASSES[:2])
    with pytest.raises(TeacherError, match=r"differ in backbone.weights_sha256: \w{12}\.\.\. vs \w{12}\.\.\."):
        stored.check(teacher=b.identity)
    with pytest.raises(TeacherError, match="backbone.weights_sha256"):  # `features extend` with another teacher
        stored.extend(b, CLASSES[2:])
    assert stored.extend(again, CLASSES[2:]).classnames == CLASSES


def test_a_missing_teacher_weight_file_is_an_error_never_replaced_by_shipped_weights(tmp_path):
    """Random weights of the world teacher's architecture in a file that is then lost: loading the teacher must not
    fall back to the shipped world weights (other weights, other soft labels)."""
    torch.manual_seed(0)
    path = tmp_path / "world-teacher-random.safetensors"
    save_file({k: v.contiguous() for k, v in load_backbone("pkd-world-teacher").model.state_dict().items()}, str(path))
    checkpoint = zero_shot_teacher(load_backbone("pkd-world-teacher", str(path))).method.save(tmp_path / "zeroshot")
    path.unlink()
    with pytest.raises(
        TeacherError, match=r"world-teacher-random.safetensors .* do not exist here.*--teacher-pretrained"
    ):
        load_teacher(checkpoint)


def test_a_weight_file_s_record_beside_it_counts_only_for_what_the_loader_reads(wide_backbone, tmp_path):
    """A config next to a weight file decides architecture and preprocessing (part of the identity); the rest of
    it (a provenance note) does not change the teacher."""
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide_backbone.model.state_dict().items()}, str(path))
    record = {"model_cfg": open_clip.get_model_config("pkd-tiny-wide"), "preprocess_cfg": {}, "notes": "first"}

    def identity(**changes):
        path.with_suffix(".json").write_text(json.dumps({**record, **changes}))
        return zero_shot_teacher(load_backbone("pkd-tiny-wide", str(path))).identity["backbone"]["weights_sha256"]

    first = identity()
    assert identity(notes="rewritten provenance") == first
    assert identity(preprocess_cfg={"interpolation": "bilinear"}) != first


def test_features_extend_redraws_a_random_teacher_from_its_recorded_seed(tmp_path):
    """`promptkd features extend --teacher-pretrained random` rebuilds the random teacher from the seed its features
    record, so it is the same teacher (before, other weights were drawn and the extension was refused)."""
    from promptkd.cli.main import main
    from promptkd.distill.teacher import build_teacher

    teacher = build_teacher(None, model="pkd-tiny", pretrained="random", seed=7)
    teacher.compute_features(CLASSES[:2]).save(tmp_path / "teacher_features")
    torch.manual_seed(123)  # whatever the process drew before must not matter
    (tmp_path / "new.txt").write_text("\n".join(CLASSES[2:]) + "\n", encoding="utf-8")
    code = main(
        [
            "features",
            "extend",
            str(tmp_path / "teacher_features"),
            "--teacher-model",
            "pkd-tiny",
            "--teacher-pretrained",
            "random",
            "--classes",
            str(tmp_path / "new.txt"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert TeacherFeatures.load(tmp_path / "teacher_features").classnames == CLASSES
