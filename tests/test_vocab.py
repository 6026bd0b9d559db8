"""The world vocabulary tokenizer: every world word is one token, and the shipped merge file is current."""

from __future__ import annotations

import pytest
import torch

from promptkd.backbones import load_backbone
from promptkd.backbones.export import save_local_dir
from promptkd.backbones.vocab import WORLD_BPE_PATH, WORLD_VOCAB_SIZE, word_merges, world_tokenizer, world_words


def test_every_world_word_is_one_token():
    tokenizer = world_tokenizer()
    assert all(len(tokenizer.encode(word)) == 1 for word in world_words())
    assert len(tokenizer.encoder) <= WORLD_VOCAB_SIZE
    ids = tokenizer(["a photo of a red star."])[0]
    assert int(ids.argmax()) == 8 and int(ids[0]) == tokenizer.sot_token_id  # SOT, 6 words, '.', EOT
    assert tokenizer.decode([int(i) for i in ids[1:8]]).strip() == "a photo of a red star ."


def test_shipped_merge_file_matches_the_vocabulary():
    import gzip

    with gzip.open(WORLD_BPE_PATH, "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()[1:]
    assert [tuple(line.split(" ")) for line in lines if line] == word_merges(world_words()), (
        "world vocabulary changed: run `python -m promptkd.backbones.vocab` (and retrain the world models)"
    )


def test_world_model_keeps_its_vocabulary_through_local_dir(tmp_path):
    backbone = load_backbone("pkd-world-student")
    assert backbone.context_length == 40 and backbone.model.token_embedding.weight.shape[0] == WORLD_VOCAB_SIZE
    folder = save_local_dir(backbone, tmp_path / "student")
    loaded = load_backbone(f"local-dir:{folder}")
    text = ["three striped hexagons on a dark background."]
    assert torch.equal(loaded.tokenize(text), backbone.tokenize(text))


def test_shipped_world_weights_load_portably():
    from promptkd.backbones import BackboneError

    backbone = load_backbone("pkd-world-student", "shipped")
    assert backbone.spec.pretrained == "shipped" and backbone.spec.source == "file"
    assert backbone.model.visual.conv1.weight.dtype == torch.float32  # stored fp16, loaded fp32
    again = load_backbone("pkd-world-student", backbone.spec.pretrained)
    assert torch.equal(again.model.visual.conv1.weight, backbone.model.visual.conv1.weight)
    with pytest.raises(BackboneError, match="ships no weights for 'pkd-tiny'"):
        load_backbone("pkd-tiny", "shipped")
