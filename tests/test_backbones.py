"""Backbone loading from names, tags, files and folders; the QuickGELU decision; every error path's message."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from promptkd.backbones import BackboneError, autocast_for, load_backbone
from promptkd.backbones.catalog import catalog
from promptkd.backbones.export import save_local_dir


def _features(backbone, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=gen)
    ids = backbone.tokenize(["a photo of a red star.", "a blue ring"])
    with torch.no_grad():
        return backbone.model.encode_image(images), backbone.model.encode_text(ids)


def _assert_same_features(a, b):
    for x, y in zip(_features(a), _features(b)):
        assert torch.allclose(x, y, atol=1e-6)


def test_facts_come_from_the_model(tiny_backbone, wide_backbone):
    assert (tiny_backbone.vision_width, tiny_backbone.text_width, tiny_backbone.embed_dim) == (64, 64, 32)
    assert (tiny_backbone.image_size, tiny_backbone.patch_size, tiny_backbone.grid_size) == (32, 8, (4, 4))
    assert (wide_backbone.vision_width, wide_backbone.embed_dim, wide_backbone.vision_layers) == (96, 48, 3)
    assert tiny_backbone.preprocess.size == 32 and tiny_backbone.preprocess.interpolation == "bicubic"
    assert tiny_backbone.spec.quick_gelu is True  # the config says so
    assert abs(float(tiny_backbone.logit_scale) - 1 / 0.07) < 1e-3


def test_openai_spelling_and_unknown_names():
    assert load_backbone("ViT-B/32").spec.model_name == "ViT-B-32"
    with pytest.raises(BackboneError, match=r"unknown model 'ViT-B-17'\. Did you mean 'ViT-B-16'"):
        load_backbone("ViT-B-17")


def test_unknown_tag_gets_did_you_mean():
    with pytest.raises(BackboneError, match=r"'opanai' is neither a pretrained tag.*Did you mean 'openai'"):
        load_backbone("ViT-B-16", "opanai")


def test_uncached_tag_offline_fails_fast_with_instructions():
    with pytest.raises(BackboneError, match="not in the local cache and this machine is offline.*--pretrained"):
        load_backbone("ViT-B-32", "openai")


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_state_dict_files_load_with_same_features(tiny_backbone, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if suffix == ".bin" else state, path)
    loaded = load_backbone("pkd-tiny", str(path))
    assert loaded.spec.source == "file" and loaded.spec.pretrained == str(path)
    _assert_same_features(tiny_backbone, loaded)
    inferred = load_backbone(None, str(path))  # architecture read from tensor shapes
    assert inferred.spec.model_name == "pkd-tiny"
    _assert_same_features(tiny_backbone, inferred)


def test_torchscript_archive_loads_as_openai_with_quickgelu(tiny_backbone, tmp_path):
    images = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            tiny_backbone.model, (images, tiny_backbone.tokenize(["a cat"])), check_trace=False, strict=False
        )
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    with pytest.warns(UserWarning, match="TorchScript archive .*only do this with files you trust"):
        loaded = load_backbone(None, str(path))
    assert loaded.spec.quick_gelu is True and "TorchScript" in loaded.spec.quick_gelu_reason
    assert loaded.spec.file_sha256 and len(loaded.spec.file_sha256) == 64
    _assert_same_features(tiny_backbone, loaded)


def test_quickgelu_decision_is_recorded_and_forceable(tiny_backbone, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(dict(tiny_backbone.model.state_dict()), str(path))
    forced = load_backbone("pkd-tiny", str(path), quick_gelu=False)
    assert forced.spec.quick_gelu is False and forced.spec.quick_gelu_reason == "set explicitly"
    act = forced.model.visual.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "GELU"
    image_features, _ = _features(forced)
    assert not torch.allclose(image_features, _features(tiny_backbone)[0], atol=1e-4)


def test_wrong_architecture_names_file_expected_and_found(wide_backbone, tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(dict(wide_backbone.model.state_dict()), str(path))
    with pytest.raises(BackboneError) as info:
        load_backbone("pkd-tiny", str(path))
    message = str(info.value)
    assert str(path) in message
    assert "Expected vision 64w x 2L patch 8" in message and "the file holds vision 96w x 3L patch 4" in message
    assert "The file matches pkd-tiny-wide" in message and "mis-shaped keys" in message


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_reported(tiny_backbone, tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(dict(tiny_backbone.model.state_dict()), full)
    else:
        save_file(dict(tiny_backbone.model.state_dict()), str(full))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(BackboneError, match=rf"{cut}.*(truncated|corrupt)"):
        load_backbone("pkd-tiny", str(cut))


def test_missing_file_and_local_dir_errors(tmp_path):
    with pytest.raises(BackboneError, match=r"weight file .*nope.pt does not exist; check the path"):
        load_backbone("pkd-tiny", str(tmp_path / "nope.pt"))
    with pytest.raises(BackboneError, match="no such folder"):
        load_backbone(f"local-dir:{tmp_path / 'missing'}")
    with pytest.raises(BackboneError, match="needs open_clip_config.json"):
        load_backbone(f"local-dir:{tmp_path}")


def test_local_dir_round_trip_keeps_quickgelu_and_preprocessing(tiny_backbone, tmp_path):
    folder = save_local_dir(tiny_backbone, tmp_path / "tiny-local")
    assert (folder / "open_clip_model.safetensors").is_file()
    loaded = load_backbone(f"local-dir:{folder}")
    assert loaded.spec.quick_gelu is True and loaded.spec.source == "local-dir"
    assert loaded.preprocess == tiny_backbone.preprocess
    _assert_same_features(tiny_backbone, loaded)


def test_sidecar_config_sets_architecture_and_activation(tiny_backbone, tmp_path):
    folder = save_local_dir(tiny_backbone, tmp_path / "d")
    weights = Path(folder) / "open_clip_model.safetensors"
    loaded = load_backbone(None, str(weights))
    assert loaded.spec.quick_gelu is True and loaded.spec.quick_gelu_reason == "config file next to the weights"
    _assert_same_features(tiny_backbone, loaded)


def test_precision_contexts(tiny_backbone):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), autocast_for("bf16", "cpu"):
        out = tiny_backbone.model.encode_image(images)
    assert out.dtype == torch.bfloat16
    with pytest.raises(BackboneError, match="fp16 on the CPU is very slow"):
        load_backbone("pkd-tiny", precision="fp16")
    with pytest.raises(BackboneError, match="unknown precision 'fp8'"):
        load_backbone("pkd-tiny", precision="fp8")


def test_catalog_lists_tags_and_offline_models():
    entries = catalog("ViT-B-16")
    tags = {(e.model, e.tag) for e in entries}
    assert ("ViT-B-16", "openai") in tags and ("ViT-B-16", "laion2b_s34b_b88k") in tags
    openai = next(e for e in entries if (e.model, e.tag) == ("ViT-B-16", "openai"))
    assert openai.quick_gelu and not openai.offline
    tiny = next(e for e in catalog("pkd-tiny") if e.model == "pkd-tiny")
    assert tiny.offline and tiny.source == "promptkd"
