"""promptkd checkpoint files: trainable tensors only, strict loading, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from promptkd.checkpoints import (
    CheckpointError,
    atomic_path,
    checkpoint_paths,
    classnames_hash,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from promptkd.prompts import PromptedTextEncoder, TextPromptLearner, VisualPrompts


class _Learner(nn.Module):
    """Shape of a method's trainable part: prompts plus a projector with BatchNorm statistics."""

    def __init__(self, backbone, classnames, n_tokens=2):
        super().__init__()
        encoder = PromptedTextEncoder(backbone.model)
        self.text = TextPromptLearner(encoder, backbone.tokenizer, classnames, init="a photo of a", deep_depth=2)
        self.visual = VisualPrompts(n_tokens, 2, backbone.vision_width)
        self.projector = nn.Sequential(nn.Linear(32, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 48))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_trainable_state_has_prompts_and_bn_buffers_only(tiny_backbone):
    learner = _Learner(tiny_backbone, ["cat", "dog"])
    keys = set(trainable_state(learner))
    assert {
        "text.ctx",
        "text.deep",
        "visual.prompts",
        "projector.1.running_mean",
        "projector.1.num_batches_tracked",
        "projector.0.weight",
        "projector.3.bias",
    } <= keys
    assert not any(k.startswith("frozen.") or "token_" in k for k in keys)


def test_round_trip_restores_values_and_config(tiny_backbone, tmp_path):
    learner = _Learner(tiny_backbone, ["cat", "dog"])
    with torch.no_grad():
        learner.projector[1].running_mean.add_(3.0)
    written = save_checkpoint(
        tmp_path / "run" / "prompts",
        trainable_state(learner),
        {"method": "test", "classnames": ["cat", "dog"], "backbone": tiny_backbone.spec.to_dict()},
    )
    assert written == tmp_path / "run" / "prompts.safetensors"
    tensors, config = load_checkpoint(tmp_path / "run" / "prompts.json")
    assert config["method"] == "test" and config["classnames_sha256"] == classnames_hash(["cat", "dog"])
    assert config["tensors"]["text.ctx"]["shape"] == [4, 64] and config["library_version"]
    other = _Learner(tiny_backbone, ["cat", "dog"])
    load_trainable_state(other, tensors, written)
    for key, value in trainable_state(learner).items():
        assert torch.equal(trainable_state(other)[key], value), key


def test_strict_load_names_missing_unexpected_and_mis_shaped(tiny_backbone, tmp_path):
    learner = _Learner(tiny_backbone, ["cat", "dog"])
    tensors = dict(trainable_state(learner))
    tensors.pop("text.deep")
    tensors["image_encoder.VPT"] = torch.zeros(2, 64)
    tensors["visual.prompts"] = torch.zeros(2, 3, 64)
    save_checkpoint(tmp_path / "bad", tensors, {"method": "test"})
    loaded, _ = load_checkpoint(tmp_path / "bad")
    target = _Learner(tiny_backbone, ["cat", "dog"])
    before = target.text.ctx.detach().clone()
    with pytest.raises(CheckpointError) as info:
        load_trainable_state(target, loaded, tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "bad.safetensors" in message and "nothing was loaded" in message
    assert "missing keys: text.deep" in message
    assert "unexpected keys: image_encoder.VPT" in message
    assert "mis-shaped keys: visual.prompts (checkpoint (2, 3, 64), model (2, 2, 64))" in message
    assert torch.equal(target.text.ctx, before)  # all or nothing


def test_missing_or_mismatched_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "none")
    save_checkpoint(tmp_path / "a", {"x": torch.zeros(2)}, {"method": "m"})
    save_checkpoint(tmp_path / "b", {"y": torch.zeros(2)}, {"method": "m"})
    (tmp_path / "a.json").write_text((tmp_path / "b.json").read_text())
    with pytest.raises(CheckpointError, match=r"disagree with a\.json"):
        load_checkpoint(tmp_path / "a")
    (tmp_path / "b.json").unlink()
    with pytest.raises(CheckpointError, match="b.json: missing.*promptkd convert"):
        load_checkpoint(tmp_path / "b")
    tensor_file = tmp_path / "a.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "a")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_checkpoint_paths_accept_any_spelling(tmp_path):
    expected = (tmp_path / "p.safetensors", tmp_path / "p.json")
    for spelling in ("p", "p.safetensors", "p.json"):
        assert checkpoint_paths(tmp_path / spelling) == expected


def test_config_is_sorted_json(tmp_path):
    save_checkpoint(tmp_path / "c", {"z": torch.ones(1), "a": torch.ones(1)}, {"method": "m", "b": 1})
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text)["format"] == "promptkd-checkpoint"
    assert text.index('"b"') < text.index('"method"')


def test_damaged_tensor_file_is_refused_not_loaded_as_other_numbers(tmp_path):
    """safetensors has no checksum: bytes flipped inside a tensor load as other values unless the JSON's digest is
    checked."""
    save_checkpoint(tmp_path / "ck", {"w": torch.arange(64, dtype=torch.float32)}, {"method": "toy"})
    tensors, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(tensors["w"], torch.arange(64, dtype=torch.float32))
    path = tmp_path / "ck.safetensors"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the tensor's bytes, the header untouched
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged or altered"):
        load_checkpoint(tmp_path / "ck")


def test_digested_files_round_trip_and_refuse_damage(tmp_path):
    from promptkd.checkpoints import read_with_digest, write_with_digest

    write_with_digest(tmp_path / "f", b"payload" * 100)
    assert read_with_digest(tmp_path / "f") == b"payload" * 100
    (tmp_path / "old").write_bytes(b"written before digests")
    assert read_with_digest(tmp_path / "old") == b"written before digests"
    data = bytearray((tmp_path / "f").read_bytes())
    data[-3] ^= 1
    (tmp_path / "f").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        read_with_digest(tmp_path / "f")
