"""ATPrompt as a prompt form: layout, the four methods with attributes, checkpoints, the attribute search and its
bad input (issue 22 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from promptkd.backbones import load_backbone
from promptkd.cli.main import main
from promptkd.methods import get_method
from promptkd.methods.base import Batch, config_from
from promptkd.prompts import PromptedTextEncoder, TextPromptLearner
from promptkd.prompts.attribute_search import (
    MAX_COMBINATIONS,
    AttributeSearch,
    AttributeSearchError,
    attribute_combinations,
    run_search,
)

CLASSES = ["red star", "blue ring", "green square", "pink cross"]
#: world-preset-like settings that fit the world student (2 text blocks, 3 image blocks)
SETTINGS = {
    "coop": {"n_ctx": 4, "ctx_init": "a photo of a"},
    "cocoop": {"n_ctx": 4, "ctx_init": "a photo of a"},
    "maple": {"n_ctx": 2, "depth": 2},
    "promptsrc": {"text_depth": 2, "vision_depth": 2, "diversity_templates": "auto"},
}


@pytest.fixture(scope="module")
def student():
    return load_backbone("pkd-world-student", "shipped").freeze()


def make(name, backbone, **overrides):
    cls = get_method(name)
    return cls(backbone, list(CLASSES), config_from(cls, {**SETTINGS[name], **overrides}))


def batch(backbone, n: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    size = backbone.image_size
    return Batch(torch.randn(n, 3, size, size, generator=g), torch.randint(0, len(CLASSES), (n,), generator=g))


# --- layout ----------------------------------------------------------------------------------------------------------
def test_attribute_words_and_soft_tokens_land_where_expected(student):
    encoder = PromptedTextEncoder(student.model)
    tok = student.tokenizer
    learner = TextPromptLearner(
        encoder, tok, CLASSES, n_ctx=4, init="a photo of a", attributes=["shape", "color"], attribute_ctx=2
    )
    shape_ids = tok(["shape"])[0, 1:2]
    color_len = int(encoder.pool_positions(tok(["color"]))[0]) - 1  # out of the world vocabulary: byte tokens
    color_ids = tok(["color"])[0, 1 : 1 + color_len]
    ids = learner.token_ids[0]
    assert torch.equal(ids[3:4], shape_ids) and torch.equal(ids[6 : 6 + color_len], color_ids)
    assert learner.deep_offset == 1 + (2 + 1) + (2 + color_len)
    prompts = learner.build()
    emb = learner.token_embedding
    attr = learner.attr_ctx
    assert torch.equal(prompts[:, 1:3], attr[0].expand(len(CLASSES), -1, -1))  # soft block 1
    assert torch.equal(prompts[:, 3], emb[:, 3])  # "shape" is a fixed word
    assert torch.equal(prompts[:, 4:6], attr[1].expand(len(CLASSES), -1, -1))  # soft block 2
    o = learner.deep_offset
    assert torch.equal(prompts[:, 6:o], emb[:, 6:o])  # "color"
    assert torch.equal(prompts[:, o : o + 4], learner.ctx.expand(len(CLASSES), -1, -1))  # class context
    assert torch.equal(prompts[:, o + 4 :], emb[:, o + 4 :])  # CLASS . EOT
    # the reference's init: attribute soft tokens N(0, 0.01²), shared by every class
    assert learner.attr_ctx.shape == (2, 2, encoder.width) and 0.005 < float(learner.attr_ctx.detach().std()) < 0.02
    # per-sample (CoCoOp) prompts with classes and a cut length agree with the full build
    ctx = learner.ctx.unsqueeze(0) + torch.randn(3, 1, encoder.width)
    cut = learner.build(ctx, batched=True, classes=slice(1, 3), length=learner.eot_length)
    full = learner.build(ctx, batched=True)
    assert torch.equal(cut, full[:, 1:3, : learner.eot_length])
    assert torch.equal(full[1, :, 1:3], attr[0].expand(len(CLASSES), -1, -1))  # attribute blocks are not shifted


@pytest.mark.parametrize("position", ["end", "front", "middle"])
def test_no_attributes_is_the_old_learner_bit_for_bit(student, position):
    encoder = PromptedTextEncoder(student.model)
    kwargs = {"n_ctx": 4, "init": None, "position": position}
    old = TextPromptLearner(encoder, student.tokenizer, CLASSES, generator=torch.Generator().manual_seed(0), **kwargs)
    new = TextPromptLearner(
        encoder, student.tokenizer, CLASSES, generator=torch.Generator().manual_seed(0), attributes=[], **kwargs
    )
    assert new.attr_ctx is None and new.deep_offset == 1
    assert torch.equal(old.token_ids, new.token_ids) and torch.equal(old.gather_index, new.gather_index)
    assert torch.equal(old.build(), new.build())
    assert set(new.state_dict()) == {"ctx"}
    expected = [0, *range(40, 44), *range(5, 40)]  # the hand-written CoOp 'end' layout
    if position == "end":
        assert new.gather_index[0].tolist() == expected


def test_no_attributes_keeps_method_outputs_and_keys(student):
    for name in SETTINGS:
        torch.manual_seed(0)
        plain = make(name, student)
        torch.manual_seed(0)
        empty = make(name, student, attributes=[])
        assert set(plain.trainable_state()) == set(empty.trainable_state())
        with torch.no_grad():
            assert torch.equal(plain.logits(batch(student).images), empty.logits(batch(student).images))


# --- the four methods ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
def test_method_trains_with_attributes_and_round_trips(name, student, tmp_path: Path):
    torch.manual_seed(0)
    method = make(name, student, attributes=["shape", "pattern"])
    assert method.learner.text.attributes == ("shape", "pattern")
    assert "text.attr_ctx" in method.trainable_state()
    before = method.learner.text.attr_ctx.detach().clone()
    opt = torch.optim.SGD(method.trainable_parameters(), lr=1.0)
    method.train()
    out = method.training_step(batch(student))
    out.loss.backward()
    assert method.learner.text.attr_ctx.grad is not None and method.learner.text.attr_ctx.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, method.learner.text.attr_ctx.detach())
    method.eval()
    path = method.save(tmp_path / "prompts")
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["method_config"]["attributes"] == ["shape", "pattern"]
    cls = get_method(name)
    torch.manual_seed(1)  # another init: the loaded tensors must replace it
    again = cls(student, list(CLASSES), config_from(cls, record["method_config"]))
    again.load(path)
    again.eval()
    images = batch(student).images
    with torch.no_grad():
        assert torch.allclose(method.logits(images), again.logits(images), atol=1e-6)
    assert torch.equal(method.learner.text.token_ids, again.learner.text.token_ids)


def test_class_specific_context_takes_attributes(student):
    encoder = PromptedTextEncoder(student.model)
    learner = TextPromptLearner(
        encoder, student.tokenizer, CLASSES, n_ctx=3, init=None, class_specific=True, attributes=["shape"]
    )
    prompts = learner.build()
    o = learner.deep_offset
    assert torch.equal(prompts[:, o : o + 3], learner.ctx)  # each class its own context
    assert torch.equal(prompts[:, 1:4], learner.attr_ctx[0].expand(len(CLASSES), -1, -1))  # shared attribute block
    assert torch.equal(learner.build(classes=slice(1, 3)), prompts[1:3])


def test_a_checkpoint_with_attributes_needs_them_to_load(student, tmp_path):
    from promptkd.checkpoints import CheckpointError

    torch.manual_seed(0)
    path = make("coop", student, attributes=["shape"]).save(tmp_path / "atp")
    with pytest.raises(CheckpointError):
        make("coop", student).load(path)


def test_deep_prompts_replace_the_class_context_not_the_attribute_blocks(student):
    torch.manual_seed(0)
    method = make("maple", student, attributes=["shape"])
    text = method.learner.text
    seen = []
    block = method.text_encoder.transformer.resblocks[1]
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            method.text_features()
    finally:
        handle.remove()
    o = text.deep_offset
    x = seen[0]
    assert torch.equal(x[:, o : o + text.n_ctx], text.deep[0].expand(x.shape[0], -1, -1).to(x.dtype))
    assert not torch.equal(x[:, 1 : 1 + text.n_ctx], text.deep[0].expand(x.shape[0], -1, -1).to(x.dtype))
    # MaPLe's coupling maps the class context only (the reference's proj(self.ctx))
    assert torch.equal(method.visual_prompts()[0], method.learner.coupling.layers[0](text.ctx))


def test_an_atprompt_teacher_serves_a_promptkd_student_unchanged(student, tmp_path):
    from promptkd.distill.teacher import load_teacher

    torch.manual_seed(0)
    teacher = make("promptsrc", student, attributes=["shape"])
    path = teacher.save(tmp_path / "teacher")
    loaded = load_teacher(str(path), device="cpu")
    features = loaded.compute_features(CLASSES)
    with torch.no_grad():
        assert torch.allclose(features.rows(CLASSES), teacher.text_features().cpu(), atol=1e-6)


# --- bad settings ----------------------------------------------------------------------------------------------------
def test_bad_attribute_settings_are_refused(student):
    from promptkd.config import ConfigError

    for bad in (["shape", " Shape "], ["shape", ""]):
        with pytest.raises(ConfigError, match="twice|empty"):
            config_from(get_method("coop"), {"attributes": bad})
    with pytest.raises(Exception, match="context length"):
        make("coop", student, attributes=[f"w{i}" for i in range(12)], attribute_ctx=4)
    with pytest.raises(ConfigError, match="unknown key 'attributes'"):
        config_from(get_method("vpt"), {"attributes": ["shape"]})


# --- the search ------------------------------------------------------------------------------------------------------
def test_combinations_in_reference_order_and_bounded():
    assert attribute_combinations(["a", "b", "c"], 2) == [("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c")]
    with pytest.raises(AttributeSearchError, match="combinations"):
        attribute_combinations([f"w{i}" for i in range(12)], 3)
    assert sum(1 for _ in attribute_combinations([f"w{i}" for i in range(6)], 6)) <= MAX_COMBINATIONS
    with pytest.raises(AttributeSearchError, match="only 2 candidates"):
        attribute_combinations(["a", "b"], 3)


def test_search_mixes_logits_and_keeps_the_highest_weight(student):
    """α moves towards the combination whose prompt classifies the validation batch best; the mechanics are checked
    with a case where one combination's text features are the image features themselves."""
    encoder = PromptedTextEncoder(student.model)
    model = AttributeSearch(
        encoder, student.tokenizer, CLASSES, [("shape",), ("pattern",), ("shape", "pattern")],
        n_ctx=2, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert (
        model.alpha.shape == (3,) and float(model.alpha.detach().min()) >= 0 and float(model.alpha.detach().max()) < 1
    )
    images = torch.nn.functional.normalize(torch.randn(len(CLASSES), 8), dim=-1)
    labels = torch.arange(len(CLASSES))
    good = images.clone()
    bad = torch.nn.functional.normalize(torch.randn(len(CLASSES), 8), dim=-1)
    text = torch.stack([bad, good, bad])
    logits = model.logits(images, 10.0, text)
    w = model.weights()
    expected = sum(w[s] * 10.0 * images @ text[s].t() for s in range(3))
    assert torch.allclose(logits, expected, atol=1e-6)
    alpha = torch.optim.Adam([model.alpha], lr=0.02, betas=(0.5, 0.999))
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(model.logits(images, 10.0, text), labels)
        alpha.zero_grad()
        loss.backward()
        alpha.step()
    assert model.best() == ("pattern",)


def test_run_search_updates_prompts_on_train_and_alpha_on_val(student):
    encoder = PromptedTextEncoder(student.model)
    model = AttributeSearch(
        encoder, student.tokenizer, CLASSES, [("shape",), ("pattern",)], n_ctx=2,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    size = student.image_size
    data = [(torch.randn(4, 3, size, size), torch.arange(4))]
    prompts_before = [p.detach().clone() for p in model.prompt_parameters()]
    alpha_before = model.alpha.detach().clone()

    def features(images):
        with torch.no_grad():
            return torch.nn.functional.normalize(student.model.encode_image(images).float(), dim=-1)

    optimizer = torch.optim.SGD(model.prompt_parameters(), lr=0.1)
    history = run_search(
        model, features, 10.0, lambda epoch: data, lambda: data, optimizer, epochs=2,
        lr_at=lambda epoch, step: 0.1, progress=False,
    )  # fmt: skip
    assert len(history) == 2 and history[-1]["best"] == " ".join(model.best())
    assert not torch.equal(alpha_before, model.alpha.detach())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(prompts_before, model.prompt_parameters()))


# --- the CLI ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from promptkd.data.world import build_world

    root = tmp_path_factory.mktemp("world")
    build_world(root, scale=0.05, n_shift_test=20, n_pretrain=40, n_retrieval=40, workers=1)
    return ["--dataset", "shapes", "--data-root", str(root)]


def test_cli_search_writes_the_choice(world, tmp_path, capsys):
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("shape\npattern\nbackground\n", encoding="utf-8")
    out = tmp_path / "search"
    argv = ["attribute-search", *world, "--candidates", str(candidates), "--max-attributes", "2", "--out", str(out),
            "--preset", "world", "--epochs", "1", "--shots", "1", "--set", "train.progress=false"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "attributes.json").read_text())
    assert len(record["combinations"]) == 6 and record["dataset"] == "shapes" and record["seed"] == 1
    best = max(record["combinations"], key=lambda r: r["weight"])
    assert record["chosen"] == best["attributes"]
    assert abs(sum(r["weight"] for r in record["combinations"]) - 1) < 1e-5
    import hashlib

    assert record["candidates_sha256"] == hashlib.sha256(b"shape\npattern\nbackground").hexdigest()
    assert record["candidates_file_sha256"] == hashlib.sha256(candidates.read_bytes()).hexdigest()
    assert "--set 'method.attributes=[" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no attributes"),
        (b"\n  \n", "holds no attributes"),
        (b"shape\nShape \n", "given twice"),
        (b"sh\xe9pe\n", "not UTF-8"),
    ],
)
def test_cli_bad_candidate_files(content, message, world, tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "attributes.json").write_text("kept")
    code = main(["attribute-search", *world, "--candidates", str(path), "--out", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert (out / "attributes.json").read_text() == "kept"  # nothing stored is lost


def test_cli_bad_search_sizes_and_methods(world, tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(f"w{i}" for i in range(12)), encoding="utf-8")
    code = main(
        ["attribute-search", *world, "--candidates", str(path), "--max-attributes", "3", "--out", str(tmp_path)]
    )
    assert code == 2 and "combinations" in capsys.readouterr().err
    code = main(["attribute-search", *world, "--candidates", str(path), "--max-attributes", "20", "--out",
                 str(tmp_path)])  # fmt: skip
    assert code == 2 and "only 12 candidates" in capsys.readouterr().err
    long = tmp_path / "long.txt"
    long.write_text("\n".join(["w" * 60, "v" * 60]), encoding="utf-8")  # byte tokens: over the 40-token context
    code = main(["attribute-search", *world, "--candidates", str(long), "--max-attributes", "2", "--preset", "world",
                 "--out", str(tmp_path / "s")])  # fmt: skip
    assert code == 2 and "context length" in capsys.readouterr().err
    assert not (tmp_path / "s" / "attributes.json").exists()
    too_many = [f"w{i}" for i in range(12)]
    code = main(["train", "--method", "coop", "--preset", "world", *world, "--shots", "1", "--out", str(tmp_path / "t"),
                 "--set", f"method.attributes=[{','.join(too_many)}]", "method.attribute_ctx=4"])  # fmt: skip
    assert code == 2 and "context length" in capsys.readouterr().err
    for method in ("vpt", "vp", "clip_adapter"):
        code = main(["train", "--method", method, "--preset", "world", *world, "--shots", "1", "--out",
                     str(tmp_path / method),
                     "--set", "method.attributes=[shape]"])  # fmt: skip
        assert code == 2 and "unknown key 'attributes'" in capsys.readouterr().err


def test_attributes_on_a_method_without_a_text_prompt_say_why(world, tmp_path, capsys):
    """vpt has no learned text prompt: the unknown key is named with the methods that take attributes."""
    code = main(
        ["train", "--method", "vpt", "--preset", "world", *world, "--out", str(tmp_path / "r"),
         "--set", "method.attributes=[color]"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "unknown key 'attributes'" in err and "coop, cocoop, maple and promptsrc" in err
    assert not (tmp_path / "r").exists()


def test_more_attributes_than_the_context_holds_keep_the_earlier_run(world, tmp_path, capsys):
    """Refused with the figure and a way out; the run folder's earlier config is left as it was."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("earlier: run\n")
    words = "[" + ", ".join(f"colour{i}" for i in range(12)) + "]"
    code = main(
        ["train", "--method", "coop", "--preset", "world", *world, "--shots", "1", "--out", str(out),
         "--set", f"method.attributes={words}", "method.attribute_ctx=8"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "fills the whole context length" in err and "use fewer attributes" in err
    assert (out / "config.yaml").read_text() == "earlier: run\n"
