"""DPC as a stage over a tuned prompt (issue 22 item 2): the parallel prompt starts as the tuned one, hard-negative
batches, class-by-class mixing, checkpoints that predict alone, export over a PromptKD student, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from promptkd.backbones import load_backbone
from promptkd.cli.main import main
from promptkd.distill.teacher import TeacherFeatures
from promptkd.methods import get_method
from promptkd.methods.base import Batch, config_from
from promptkd.methods.dpc import DPC, DPCConfig, DPCError
from promptkd.protocols.runner import per_run_overrides

BASE = ["red star", "blue ring", "green square", "pink cross", "gold moon", "grey kite"]
NEW = ["teal wave", "black bolt"]


@pytest.fixture(scope="module")
def student():
    return load_backbone("pkd-world-student", "shipped").freeze()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def coop_ckpt(student, tmp_path_factory):
    """A 'tuned' CoOp prompt: its context moved away from the init so P is not the phrase."""
    cls = get_method("coop")
    torch.manual_seed(0)
    method = cls(student, list(BASE), config_from(cls, {"n_ctx": 4}))
    with torch.no_grad():
        method.learner.text.ctx.add_(0.05 * torch.randn_like(method.learner.text.ctx))
    path = tmp_path_factory.mktemp("coop") / "prompts"
    method.save(path)
    return path


@pytest.fixture(scope="module")
def student_ckpt(student, tmp_path_factory):
    """A PromptKD student with stored features of base and new classes, saved as a run folder is."""
    cls = get_method("promptkd")
    torch.manual_seed(0)
    names = [*BASE, *NEW]
    features = TeacherFeatures(
        F.normalize(torch.randn(len(names), student.embed_dim), dim=-1), 100.0, names, {"method": "zeroshot"}
    )
    method = cls(student, list(BASE), config_from(cls, {"n_ctx_vision": 2, "vision_depth": 2}), features=features)
    method.eval()
    folder = tmp_path_factory.mktemp("student")
    method.save(folder / "prompts")
    features.save(folder / "teacher_features")
    return folder


def dpc(student, base_path, **config) -> DPC:
    return DPC(student, list(BASE), DPCConfig(base=str(base_path), **config))


def tuned(student, path):
    from promptkd.checkpoints import load_checkpoint

    _, meta = load_checkpoint(path)
    cls = get_method(meta["method"])
    method = cls(student, list(meta["classnames"]), config_from(cls, meta["method_config"]))
    method.load(path)
    return method.eval()


def test_the_parallel_prompt_starts_as_the_tuned_one(student, coop_ckpt):
    method = dpc(student, coop_ckpt).eval()
    reference = tuned(student, coop_ckpt)
    x = images(3, student.image_size)
    for classes in (BASE, [*BASE, *NEW], NEW):
        method.set_classnames(list(classes))
        reference.set_classnames(list(classes))
        with torch.no_grad():
            assert torch.allclose(method.logits(x), reference.logits(x), atol=1e-5)


def test_base_classes_use_the_base_mixture_and_new_ones_the_new_mixture(student, coop_ckpt):
    method = dpc(student, coop_ckpt, weight_base=0.5, weight_new=0.2).eval()
    p = method.tuned["ctx"].clone()
    with torch.no_grad():
        method.learner.parallel["ctx"].add_(0.3 * torch.randn_like(p))
    m = method.learner.parallel["ctx"].detach().clone()
    parallel = p + (m - p) / 0.5  # P' = P + (M - P)/ω_b
    reference = tuned(student, coop_ckpt)
    x = images(4, student.image_size, seed=1)
    method.set_classnames([*BASE, *NEW])
    with torch.no_grad():
        got = method.logits(x)
        reference.set_classnames([*BASE, *NEW])
        reference.learner.text.ctx.copy_(m)  # ω_b·P' + (1-ω_b)·P is M itself
        expected_base = reference.logits(x)[:, : len(BASE)]
        reference.learner.text.ctx.copy_(0.2 * parallel + 0.8 * p)
        reference.clear_cache()
        expected_new = reference.logits(x)[:, len(BASE) :]
    assert torch.allclose(got[:, : len(BASE)], expected_base, atol=1e-5)
    assert torch.allclose(got[:, len(BASE) :], expected_new, atol=1e-5)
    assert not torch.allclose(expected_base[:, :1], expected_new[:, :1])


def test_hard_negatives_follow_the_tuned_model_and_never_repeat(student, coop_ckpt):
    torch.manual_seed(0)
    method = dpc(student, coop_ckpt, hard_negatives=4)
    method.bank = {c: torch.randn(2, student.embed_dim) for c in range(len(BASE))}
    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4], [1.0, 9, 8, 7, 6, 5]])
    chosen = method.hard_negatives(scores, torch.tensor([0, 1]))
    assert chosen[0] == [2, 3]  # top-4 {0,1,2,3} less the true 0; 1 is another image's class already in the batch
    assert chosen[1] == [4, 5] or len(chosen[1]) == 2  # top-4 {1,2,3,0}: all in the batch, two random free classes
    flat = [0, 1, *chosen[0], *chosen[1]]
    assert len(flat) == len(set(flat))


def test_a_training_step_moves_only_the_parallel_prompt(student, coop_ckpt):
    method = dpc(student, coop_ckpt)
    size = student.image_size
    labels = torch.arange(len(BASE)).repeat(2)
    method.prepare(lambda: [Batch(images(len(labels), size, seed=2), labels)], None)
    assert sorted(method.bank) == list(range(len(BASE)))
    method.train()
    out = method.training_step(Batch(images(4, size, seed=3), labels[:4]))
    assert math.isfinite(float(out.loss.detach())) and out.logs["widened"] > 4
    out.loss.backward()
    assert method.learner.parallel["ctx"].grad is not None and method.learner.parallel["ctx"].grad.abs().sum() > 0
    assert all(p.grad is None for p in method.base.parameters())
    assert not method.base.training  # the tuned model stays in eval mode


def test_checkpoint_predicts_alone_and_weights_are_settable(student, coop_ckpt, tmp_path):
    method = dpc(student, coop_ckpt)
    with torch.no_grad():  # random: a constant shift of every token vanishes in the text tower's LayerNorm
        method.learner.parallel["ctx"].add_(0.3 * torch.randn_like(method.learner.parallel["ctx"]))
    method.eval()
    method.save(tmp_path / "dpc" / "prompts")
    record = json.loads((tmp_path / "dpc" / "prompts.json").read_text())
    assert record["base_checkpoint"]["method"] == "coop" and len(record["base_checkpoint"]["sha256"]) == 64
    x = images(2, student.image_size)
    method.set_classnames([*BASE, *NEW])
    with torch.no_grad():
        expected = method.logits(x)
    restored = DPC.from_checkpoint(tmp_path / "dpc" / "prompts", classnames=[*BASE, *NEW])
    with torch.no_grad():
        assert torch.allclose(restored.logits(x), expected, atol=1e-5)
        other = DPC.from_checkpoint(tmp_path / "dpc" / "prompts", classnames=[*BASE, *NEW], weight_new=0.0)
        logits = other.logits(x)
    assert torch.allclose(logits[:, : len(BASE)], expected[:, : len(BASE)], atol=1e-5)
    assert not torch.allclose(logits[:, len(BASE) :], expected[:, len(BASE) :], atol=1e-4)


def test_over_a_promptkd_student_the_projector_is_mixed_and_exported(student, student_ckpt, tmp_path):
    from promptkd.deploy import load_for_inference

    method = dpc(student, student_ckpt, weight_base=0.2, weight_new=0.0)
    assert set(method.tuned) == {name for name, _ in method.base.learner.projector.named_parameters()}
    with torch.no_grad():
        for value in method.learner.parallel.values():
            value.add_(0.3 * torch.randn_like(value))
    method.eval()
    method.save(tmp_path / "prompts")
    record = json.loads((tmp_path / "prompts.json").read_text())
    assert record["teacher_features_file"] == str((student_ckpt / "teacher_features.safetensors").resolve())
    restored = load_for_inference(tmp_path / "prompts")
    restored.set_classnames([*BASE, *NEW])
    x = images(3, student.image_size)
    plain = get_method("promptkd").from_checkpoint(student_ckpt / "prompts", classnames=[*BASE, *NEW], backbone=student)
    with torch.no_grad():
        got = restored.logits(x)
        assert torch.allclose(got[:, len(BASE) :], plain.logits(x)[:, len(BASE) :], atol=1e-5)  # ω_n = 0: P alone
        assert not torch.allclose(got[:, : len(BASE)], plain.logits(x)[:, : len(BASE)], atol=1e-4)
        assert torch.allclose(restored.deployable()(x), got, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("weight_new", "1.5", "must be from 0 to 1"),
        ("weight_new", "-0.1", "must be from 0 to 1"),
        ("weight_new", "nan", "finite number"),
        ("weight_base", "0", "above 0 up to 1"),
        ("hard_negatives", "1", "at least 2"),
    ],
)
def test_weights_outside_zero_one_are_refused(key, value, message):
    from promptkd.config import ConfigError

    with pytest.raises(ConfigError, match=f"dpc config.{key}: .*{message}"):
        config_from(DPC, {key: value})


def test_unwrappable_checkpoints_are_refused_before_any_work(student, tmp_path, capsys):
    cls = get_method("vpt")
    vpt = cls(student, list(BASE), config_from(cls, {"depth": 1}))
    vpt.save(tmp_path / "vpt" / "prompts")
    with pytest.raises(DPCError, match="no tuned prompt"):
        DPCConfig(base=str(tmp_path / "vpt"))
    with pytest.raises(DPCError, match="no such run folder"):
        DPCConfig(base=str(tmp_path / "nowhere"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("kept: true\n")
    argv = ["train", "--method", "dpc", "--dataset", "shapes", "--out", str(out), "--set"]
    assert main([*argv, f"method.base={tmp_path / 'vpt'}"]) == 2
    assert "no tuned prompt" in capsys.readouterr().err
    assert main([*argv, f"method.base={tmp_path / 'vpt'}", "method.weight_base=2"]) == 2
    assert "weight_base: must be above 0 up to 1, got 2" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "kept: true\n"  # nothing already stored lost


def test_protocol_overrides_name_each_runs_stage():
    assert per_run_overrides(["method.base=runs/{dataset}/coop/seed_{seed}", "train.lr=1"], "shapes", 3) == [
        "method.base=runs/shapes/coop/seed_3",
        "train.lr=1",
    ]
