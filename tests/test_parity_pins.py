"""Pins of the places where promptkd follows a reference implementation number for number: PromptSRC's template list
and loss terms, CoOp lpclip's choice of C, Tip-Adapter(-F)'s training recipe, and visual prompting's LR schedule.

Each reference rule is transcribed here from its public source, independently of the package, on fixed inputs."""

from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptkd.config import ConfigError, from_dict, load_preset
from promptkd.data.templates import OPENAI_IMAGENET_TEMPLATES, PROMPTSRC_IMAGENET_TEMPLATES
from promptkd.engine.config import TrainConfig
from promptkd.engine.run import resolve_run_config
from promptkd.engine.trainer import learning_rate
from promptkd.evaluation.linear_probe import linear_probe
from promptkd.methods.promptsrc import diversity_prompts, promptsrc_losses


# --- PromptSRC (muzairkhattak/PromptSRC trainers/imagenet_templates.py, trainers/promptsrc.py) ---------------------
def test_promptsrc_template_list_and_loss_terms():
    templates = list(PROMPTSRC_IMAGENET_TEMPLATES)
    assert len(templates) == len(set(templates)) == 60
    assert templates[0] == "a photo of a {}." and templates[-1] == "itap of the {}."
    digest = hashlib.sha256("\n".join(templates).encode()).hexdigest()
    assert digest == "dc3398ed3ffc7c259342582bc0f36d7ac66c4dee17981a37b77b0fc9c23d4f72"
    # The reference's copy: "a photo of a {}." moved to the front of OpenAI's first 60, the rest in OpenAI's order.
    assert templates == ["a photo of a {}."] + [t for t in OPENAI_IMAGENET_TEMPLATES[:60] if t != "a photo of a {}."]
    assert diversity_prompts(["golden_retriever"])[0] == [t.format("golden retriever") for t in templates]
    # The loss terms on fixed tensors (Eq. 2-5; t̃ enters normalised).
    image = F.normalize(_wave(4, 6, 0.7, 0.1), dim=-1).float()
    frozen_image = F.normalize(_wave(4, 6, 0.9, 0.5), dim=-1).float()
    text = F.normalize(_wave(3, 6, 1.3, 0.2), dim=-1).float()
    fixed_text = (3 * _wave(3, 6, 0.4, 1.0)).float()  # t̃ before normalisation
    logits = 20.0 * image @ text.t()
    terms = promptsrc_losses(logits, torch.tensor([0, 2, 1, 2]), text, fixed_text, image, frozen_image, 20.0, 25, 10)
    pinned = {"ce": 2.3473036, "kl": 3.8213987, "text": 10.8047028, "image": 5.7068424, "loss": 22.6802464}
    for key, value in pinned.items():
        assert float(terms[key]) == pytest.approx(value, rel=2e-6), key


def _wave(rows: int, cols: int, freq: float, phase: float) -> torch.Tensor:
    """Fixed values with no random generator involved: sin(freq * i + phase) over a row-major grid."""
    return torch.sin(freq * torch.arange(rows * cols, dtype=torch.float64) + phase).reshape(rows, cols)


# --- Linear probe (KaiyangZhou/CoOp lpclip/linear_probe.py) ----------------------------------------------------------
def _lpclip_c(x_train, y_train, x_val, y_val, num_step: int = 8) -> float:
    """lpclip's rule: sweep 1e6 .. 1e-6 (first maximum), then bisect [peak/10, peak*10] in log10 C num_step times."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    def accuracy(c: float) -> float:
        with warnings.catch_warnings(), threadpool_limits(1):  # one thread: tiny fits, a busy machine
            warnings.simplefilter("ignore")
            clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(x_train, y_train)
        return float(np.mean(clf.predict(x_val) == y_val))

    search = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    peak = search[int(np.argmax([accuracy(c) for c in search]))]
    left, right, final = peak / 10, peak * 10, peak
    for _ in range(num_step):
        if accuracy(left) < accuracy(right):
            final, left, right = right, 10 ** (0.5 * (np.log10(right) + np.log10(left))), right
        else:
            final, left, right = left, left, 10 ** (0.5 * (np.log10(right) + np.log10(left)))
    return float(final)


def _features(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features of uneven norms (as CLIP's are), so raw and L2-normalised fits differ."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(n_per_class)
    x = torch.eye(4, 8)[labels] * 1.5 + 1.2 * torch.randn(len(labels), 8, generator=gen)
    return x * (0.5 + 3 * torch.rand(len(labels), 1, generator=gen)), labels


def test_linear_probe_chooses_c_as_lpclip_on_raw_features():
    train, val, test = _features(4, 3), _features(6, 103), _features(5, 7)
    expected = _lpclip_c(train[0].double().numpy(), train[1].numpy(), val[0].double().numpy(), val[1].numpy())
    result = linear_probe(train, val, test, num_classes=4)
    chosen = result.C
    assert chosen == pytest.approx(expected, rel=1e-9)
    assert result.selection["features"] == "raw"
    steps = result.selection["search"]
    assert len(steps) <= 7 + 2 * 8 and {s["stage"] for s in steps} == {"coarse", "refine"}
    assert "lpclip" in result.selection["criterion"]
    normalised = linear_probe(train, val, test, num_classes=4, features="normalized")
    assert normalised.selection["features"] == "normalized" and normalised.C != result.C  # the named deviation


# --- Tip-Adapter(-F) (gaopengcuhk/Tip-Adapter main.py, configs/imagenet.yaml) ----------------------------------------
def test_tip_adapter_imagenet_presets_crop_as_the_reference():
    for method in ("tip_adapter", "tip_adapter_f"):
        train = from_dict(TrainConfig, load_preset(method, "imagenet")["train"])
        assert train.crop_scale == (0.5, 1.0), method


def test_tip_adapter_f_without_a_preset_trains_with_its_recipe():
    train = resolve_run_config("tip_adapter_f", None, [], {}).train
    assert (train.optimizer, train.lr, train.eps, train.weight_decay, train.betas) == (
        "adamw",
        1e-3,
        1e-4,
        0.01,
        (0.9, 0.999),
    )
    assert (train.epochs, train.batch_size, train.crop_scale) == (20, 256, (0.5, 1.0))
    assert (train.scheduler, train.schedule_per, train.warmup_type, train.warmup_epochs) == (
        "cosine",
        "step",
        "none",
        0,
    )
    assert resolve_run_config("tip_adapter", None, [], {}).train.crop_scale == (0.5, 1.0)
    # A preset and --set still win over the method's recipe; other methods keep the engine's defaults.
    assert resolve_run_config("tip_adapter_f", "world", [], {}).train.batch_size == 64
    assert resolve_run_config("tip_adapter_f", None, ["train.lr=0.01"], {}).train.lr == 0.01
    assert resolve_run_config("coop", None, [], {}).train == TrainConfig(seed=1)  # train.seed: the run seed


# --- Visual prompting (hjbahng/visual_prompting utils.py cosine_lr, main_clip.py) ------------------------------------
def _vp_cosine_lr(base_lr: float, warmup_length: int, steps: int, step: int) -> float:
    if step < warmup_length:
        return base_lr * (step + 1) / warmup_length
    e, es = step - warmup_length, steps - warmup_length
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


@pytest.mark.parametrize("steps_per_epoch", [196, 37])  # CIFAR-100 at batch 256, and a smaller dataset
def test_vp_schedule_is_the_references_step_by_step(steps_per_epoch):
    cfg = from_dict(TrainConfig, {**load_preset("vp", "vit_b32_pad30_ep1000_batch256")["train"], "epochs": 30})
    total = cfg.epochs * steps_per_epoch
    ours = [learning_rate(cfg, s // steps_per_epoch, s % steps_per_epoch, steps_per_epoch) for s in range(total)]
    reference = [_vp_cosine_lr(40.0, 1000, total, s) for s in range(total)]
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-12)
    assert ours[0] == pytest.approx(40.0 / 1000) and ours[999] == pytest.approx(40.0)  # 1,000 steps, any dataset
    full = from_dict(TrainConfig, load_preset("vp", "vit_b32_pad30_ep1000_batch256")["train"])
    assert (full.epochs, full.lr, full.warmup_steps, full.warmup_type) == (1000, 40.0, 1000, "open_clip")


def test_step_warmup_needs_a_per_step_schedule():
    assert from_dict(TrainConfig, {"warmup_steps": 10, "schedule_per": "step"}).warmup_steps == 10
    for bad in ({"warmup_steps": 10}, {"warmup_type": "open_clip"}):  # the default schedule_per is "epoch"
        with pytest.raises(ConfigError, match="count optimizer steps"):
            from_dict(TrainConfig, bad)
    with pytest.raises(ConfigError, match="warmup_steps"):
        from_dict(TrainConfig, {"warmup_steps": -1, "schedule_per": "step"})
