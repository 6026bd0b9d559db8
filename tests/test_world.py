"""Tests of the embedded world: vocabulary, class design, held-out compositions, rendering and the on-disk build."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptkd.data import world
from promptkd.data.world import build as world_build

# A tiny world (~900 images): per class 2 train / 1 val / 2 test images, 1 per domain-shifted class, 2 per
# pre-training composition, and 20 retrieval images. MICRO has one image per class and split (~580 images).
TINY = {"scale": 0.05, "n_shift_test": 20, "n_pretrain": 40, "n_retrieval": 400}
MICRO = {"scale": 0.01}
COMPOSITIONAL = ("shapes", "patterns", "counts")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("w") / "world"
    manifest = world.build_world(root, seed=0, workers=1, **TINY)
    return root, manifest


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary and class design
# ----------------------------------------------------------------------------------------------------------------------


def test_vocabulary_is_small_and_covers_every_text():
    vocab = set(world.WORLD_VOCABULARY)
    assert list(world.WORLD_VOCABULARY) == sorted(vocab)
    assert 30 <= len(vocab) <= 60
    texts = [
        p
        for name in world.list_datasets()
        for t in world.get_dataset(name).templates
        for p in world.get_dataset(name).prompts(t)
    ]
    for classname in world.pretrain_classnames():
        attrs = world.pretrain_attributes(classname, np.random.default_rng(0))
        texts += world.caption_choices(classname, attrs)
    assert len(texts) > 1000
    for text in texts:
        assert set(world.caption_words(text)) <= vocab, text
    assert world.caption_words("a photo of a red star, a type of shape.") == [
        "a",
        "photo",
        "of",
        "a",
        "red",
        "star",
        "a",
        "type",
        "of",
        "shape",
    ]


def test_prompt_words_are_seen_in_pretraining_captions():
    # Every word of every zero-shot prompt occurs in some pre-training caption, so its embedding gets trained.
    seen = set()
    for classname in world.pretrain_classnames():
        attrs = world.pretrain_attributes(classname, np.random.default_rng(1))
        for caption in world.caption_choices(classname, attrs):
            seen.update(world.caption_words(caption))
    for name in world.list_datasets():
        ds = world.get_dataset(name)
        for template in ds.templates:
            for prompt in ds.prompts(template):
                assert set(world.caption_words(prompt)) <= seen, prompt


SHIFTS = ("shapes_v2", "shapes_sketch", "shapes_r", "shapes_a")  # ImageNet-V2, -Sketch, -R and -A's analogues


def test_datasets_metadata():
    assert world.list_datasets() == ["shapes", "patterns", "counts", *SHIFTS, "shapes_noise"]
    assert world.list_datasets(include_test_only=False) == ["shapes", "patterns", "counts"]
    sizes = {name: world.get_dataset(name).num_classes for name in world.list_datasets()}
    assert sizes == {"shapes": 64, "patterns": 32, "counts": 24, **dict.fromkeys([*SHIFTS, "shapes_noise"], 64)}
    shapes = world.get_dataset("shapes")
    assert shapes.template == "a photo of a {}, a type of shape."
    assert world.get_dataset("patterns").template == "a photo of a {}, a type of pattern."
    assert world.get_dataset("counts").prompts()[:2] == ["a photo of two circles.", "a photo of two triangles."]
    assert len(set(shapes.classnames)) == 64
    assert shapes.classnames[:3] == ("red circle", "red triangle", "red cross")
    assert (len(shapes.base_classnames), len(shapes.new_classnames)) == (32, 32)
    assert (len(world.get_dataset("counts").base_classnames), len(world.get_dataset("counts").new_classnames)) == (
        12,
        12,
    )
    with pytest.raises(KeyError, match="unknown world dataset"):
        world.get_dataset("imagenet")


@pytest.mark.parametrize("name", COMPOSITIONAL)
def test_base_and_new_halves_share_every_word(name):
    ds = world.get_dataset(name)
    m = math.ceil(ds.num_classes / 2)
    assert ds.base_classnames == ds.classnames[:m]
    base_words = {w for c in ds.base_classnames for w in c.split()}
    new_words = {w for c in ds.new_classnames for w in c.split()}
    assert new_words <= base_words
    assert base_words == new_words  # and the other way round: both halves use the full vocabulary of the dataset
    assert not set(ds.base_classnames) & set(ds.new_classnames)


def test_domain_shifted_sets_share_the_source_classes():
    for name in (*SHIFTS, "shapes_noise"):
        ds = world.get_dataset(name)
        assert ds.test_only and ds.source == "shapes"
        assert ds.classnames == world.get_dataset("shapes").classnames
        assert ds.templates == world.get_dataset("shapes").templates
        assert ds.style != world.get_dataset("shapes").style
    # The four ImageNet-like shifts are the default targets; the much harsher noise set is a stress set.
    assert world.shift_datasets("shapes") == list(SHIFTS)
    assert world.shift_datasets("shapes", include_stress=True) == [*SHIFTS, "shapes_noise"]
    assert world.shift_datasets("patterns") == [] and world.get_dataset("shapes_noise").stress
    assert len({world.get_dataset(n).style for n in SHIFTS}) == 4


def test_each_shift_has_at_least_a_thousand_test_images_by_default():
    datasets = world_build._manifest(world_build.WorldConfig())["datasets"]
    for name in SHIFTS:
        assert datasets[name]["num_images"] == {"train": 0, "val": 0, "test": 1920}, name


def _first_images(name: str, seed: int, n: int = 2) -> list[bytes]:
    """The first images of every class of a world dataset, as a build with this seed renders them (PNG bytes)."""
    tasks = world_build._plan(world_build.WorldConfig(seed=seed))[name]
    return [
        world_build.encode_png(img)
        for task in tasks
        for _, _, img, _ in world_build._task_images(dataclasses.replace(task, n=n))
    ]


@pytest.mark.parametrize("name", SHIFTS)
def test_shift_sets_render_the_same_bytes_per_seed_and_new_ones_per_seed(name):
    first = _first_images(name, seed=0)
    assert len(first) == 128 and first == _first_images(name, seed=0)
    other = _first_images(name, seed=1)
    assert all(a != b for a, b in zip(first, other))
    # shapes_v2 is a new draw of the source's look: none of its images is one of shapes' own.
    assert not set(first) & set(_first_images("shapes", seed=0, n=4))


def test_pretraining_content_is_what_the_shipped_weights_saw():
    # World version 4 changed only test-only sets: the pre-training corpus (and the vocabulary) are version 3's, the
    # one the shipped CLIPs were trained on. A change to them must bump PRETRAIN_VERSION and re-make the weights.
    assert world_build.pretrain_digest() == world_build.PRETRAIN_DIGEST
    assert world.PRETRAIN_VERSION == 3 < world.WORLD_VERSION == 4


def test_parse_caption():
    assert world.parse_caption("a photo of two red striped stars on a dark background.") == world.Attributes(
        "star", "red", "striped", 2
    )
    assert world.parse_caption("a picture of a small cyan ring, a type of shape.") == world.Attributes(
        "ring", "cyan", None, None, "small"
    )


def test_parse_classname():
    assert world.parse_classname("red star") == world.Attributes(shape="star", colour="red")
    assert world.parse_classname("three crosses") == world.Attributes(shape="cross", count=3)
    assert world.parse_classname("small blue striped ring") == world.Attributes(
        "ring", "blue", "striped", None, "small"
    )
    assert world.Attributes("star", "red", "striped", 2).phrase() == "two red striped stars"
    for bad in ("red", "red blue star", "three star", "stars", "purple elephant"):
        with pytest.raises(ValueError):
            world.parse_classname(bad)


# ----------------------------------------------------------------------------------------------------------------------
# Held-out compositions
# ----------------------------------------------------------------------------------------------------------------------


def test_held_out_design():
    held = world.held_out_compositions()
    assert {k: len(v) for k, v in held.items()} == {"shapes": 16, "patterns": 6, "counts": 6}
    assert held["shapes"][:3] == ("red triangle", "green star", "blue cross")
    pretrain = set(world.pretrain_classnames())
    assert len(pretrain) == 64 + 32 + 24 - 28
    for name in COMPOSITIONAL:
        ds = world.get_dataset(name)
        assert set(ds.held_out) <= set(ds.classnames)
        assert not set(ds.held_out) & pretrain
        # Held-out compositions fall in both halves, evenly.
        in_base = sum(c in ds.base_classnames for c in ds.held_out)
        assert in_base == len(ds.held_out) - in_base
        # Every word of the dataset still occurs in pre-training compositions.
        seen = {w for c in ds.classnames if c in pretrain for w in c.split()}
        assert seen == {w for c in ds.classnames for w in c.split()}


def test_pretraining_attributes_never_depict_held_out_pairs():
    rng = np.random.default_rng(0)
    colours = set()
    for _ in range(200):
        attrs = world.pretrain_attributes("dotted star", rng)
        assert not world.depicts_held_out(attrs)
        colours.add(attrs.colour)
    # "green star" and "cyan star" are held out of shapes, so no pre-training dotted star is green or cyan.
    assert colours == set(world.COLOURS) - {"green", "cyan"}
    assert world.depicts_held_out(world.Attributes("star", "green", "striped", 1))
    assert world.depicts_held_out(world.Attributes("ring", "red", "dotted", 1))  # "dotted ring" held out
    assert not world.depicts_held_out(world.Attributes("star", "red", "plain", 1))
    for held_out in ("green star", "striped star", "three stars"):
        with pytest.raises(ValueError, match="held-out"):
            world.pretrain_attributes(held_out, rng)


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


def test_render_is_deterministic_and_sized():
    for style in world.STYLES:
        a = world.render("striped star", style, np.random.default_rng(5))
        b = world.render("striped star", style, np.random.default_rng(5))
        c = world.render("striped star", style, np.random.default_rng(6))
        assert a.size == (32, 32) and a.mode == "RGB"
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() != c.tobytes()
    big = world.render("two red rings", "scene", 0, image_size=64, supersample=2)
    assert big.size == (64, 64)
    with pytest.raises(ValueError, match="unknown style"):
        world.render("red star", "oil painting", 0)


def test_render_styles_differ_as_designed():
    rng = np.random.default_rng(0)
    clean = np.stack([np.asarray(world.render("red circle", "clean", rng), np.float32) for _ in range(20)])
    scene = np.stack([np.asarray(world.render("red circle", "scene", rng), np.float32) for _ in range(20)])
    sketch = np.stack([np.asarray(world.render("red circle", "sketch", rng), np.float32) for _ in range(20)])
    hard = np.stack([np.asarray(world.render("red circle", "hard", rng), np.float32) for _ in range(20)])
    noisy = np.stack([np.asarray(world.render("red circle", "noisy", rng), np.float32) for _ in range(20)])
    corner = (slice(None), slice(0, 3), slice(0, 3))
    assert clean[corner].max() < 60  # plain dark background
    assert scene[corner].mean() > 60  # muted, brighter textured backgrounds
    assert sketch[corner].min() > 130  # light paper
    # Red object: the clean centre pixel is red, and clean objects are bigger than scene ones on average (since
    # world v3 only somewhat: scene shapes must stay legible at 32 px).
    centre = clean[:, 16, 16]
    assert (centre[:, 0] > 150).all() and (centre[:, 1] < 90).all()
    red = lambda x: ((x[..., 0] > 150) & (x[..., 1] < 100) & (x[..., 2] < 100)).mean()  # noqa: E731
    assert 1.2 * red(scene) < red(clean) < 1.8 * red(scene)
    assert red(hard) < red(scene)  # smaller, partly occluded objects
    # Pixel noise: neighbouring-pixel differences are largest in the noisy style.
    rough = lambda x: np.abs(np.diff(x, axis=2)).mean()  # noqa: E731
    assert rough(noisy) > 3 * rough(scene)


def test_square_and_diamond_stay_distinct():
    # The filled area's bounding box: an axis-aligned square fills its box, a 45-degree diamond only half of it.
    for shape, lo, hi in (("square", 0.85, 1.01), ("diamond", 0.4, 0.65)):
        for seed in range(10):
            img = np.asarray(world.render(f"red {shape}", "clean", seed, image_size=64), np.int32)
            mask = (img[..., 0] > 120) & (img[..., 1] < 110)
            ys, xs = np.nonzero(mask)
            fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            assert lo < fill < hi, (shape, seed, fill)


def test_encode_png_round_trips():
    img = world.render("three blue stars", "noisy", 3)
    data = world_build.encode_png(img)
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.mode == "RGB"
    assert back.tobytes() == img.tobytes()
    big = world.render("red star", "scene", 3, image_size=96, supersample=2)
    assert Image.open(io.BytesIO(world_build.encode_png(big))).tobytes() == big.tobytes()


# ----------------------------------------------------------------------------------------------------------------------
# Building on disk
# ----------------------------------------------------------------------------------------------------------------------


def test_layout_and_split_files(tiny_world):
    root, manifest = tiny_world
    assert json.loads((root / "world.json").read_text()) == manifest
    assert manifest["version"] == world.WORLD_VERSION
    assert manifest["counts"] == {
        "n_train": 2,
        "n_val": 1,
        "n_test": 2,
        "n_shift_test": 1,
        "n_pretrain": 2,
        "n_retrieval": 20,
    }
    for name in world.list_datasets():
        ds = world.get_dataset(name)
        info = manifest["datasets"][name]
        assert info["classnames"] == list(ds.classnames)
        assert info["template"] == ds.template
        split = json.loads((root / name / f"split_zhou_{ds.split_name}.json").read_text())
        assert list(split) == ["train", "val", "test"]
        expected = {"train": 0, "val": 0, "test": 1} if ds.test_only else {"train": 2, "val": 1, "test": 2}
        assert {k: len(v) for k, v in split.items()} == {k: n * ds.num_classes for k, n in expected.items()}
        assert {k: len(v) for k, v in split.items()} == info["num_images"]
        labels = set()
        for items in split.values():
            for relpath, label, classname in items:
                assert isinstance(label, int) and ds.classnames[label] == classname
                assert relpath == f"{classname.replace(' ', '_')}/{Path(relpath).name}"
                labels.add(label)
        assert labels == set(range(ds.num_classes))
        paths = [p for items in split.values() for p, _, _ in items]
        assert len(set(paths)) == len(paths)
        on_disk = sorted(str(p.relative_to(root / name / "images")) for p in (root / name / "images").rglob("*.png"))
        assert on_disk == sorted(paths)
    img = Image.open(root / "shapes" / "images" / "red_star" / "0000.png")
    assert img.size == (32, 32) and img.mode == "RGB"


def test_domain_shifted_splits_are_test_only(tiny_world):
    root, _ = tiny_world
    source = json.loads((root / "shapes" / "split_zhou_WorldShapes.json").read_text())
    for name in (*SHIFTS, "shapes_noise"):
        split_name = world.get_dataset(name).split_name
        split = json.loads((root / name / f"split_zhou_{split_name}.json").read_text())
        assert split["train"] == [] and split["val"] == []
        assert sorted({(lab, c) for _, lab, c in split["test"]}) == sorted({(lab, c) for _, lab, c in source["test"]})


def test_pretraining_corpus(tiny_world):
    root, manifest = tiny_world
    rows = [json.loads(line) for line in (root / "pretrain" / "captions.jsonl").read_text().splitlines()]
    classnames = manifest["pretrain"]["classnames"]
    assert classnames == list(world.pretrain_classnames())
    assert len(rows) == 2 * len(classnames) == manifest["pretrain"]["num_images"]
    held = {c for v in manifest["pretrain"]["held_out"].values() for c in v}
    assert held == {c for v in world.held_out_compositions().values() for c in v}
    for row in rows:
        assert list(row) == ["image", "caption", "label", "classname"]
        assert classnames[row["label"]] == row["classname"] and row["classname"] not in held
        assert (root / "pretrain" / "images" / row["image"]).is_file()
        assert set(world.caption_words(row["caption"])) <= set(world.WORLD_VOCABULARY)
        # No caption names a held-out pair, e.g. "a green dotted star" when "green star" is held out.
        attrs = world.parse_caption(row["caption"])
        assert attrs.shape == world.parse_classname(row["classname"]).shape
        assert not world.depicts_held_out(attrs), row
    # Pre-training images mix the clean style (plain dark corners) and the web style (dark-to-mid backgrounds);
    # neither has the downstream scenes' light backgrounds.
    corners = [np.asarray(Image.open(root / "pretrain" / "images" / r["image"]))[:2, :2].max() for r in rows[:60]]
    assert max(corners) < 170
    assert sum(c < 60 for c in corners) >= 15 and sum(c >= 60 for c in corners) >= 5


def test_retrieval_set_is_coco_style(tiny_world):
    root, _ = tiny_world
    coco = json.loads((root / "retrieval" / "captions_coco.json").read_text())
    assert len(coco["images"]) == 20 and len(coco["annotations"]) == 100
    assert [im["id"] for im in coco["images"]] == list(range(20))
    for im in coco["images"]:
        assert (root / "retrieval" / "images" / im["file_name"]).is_file()
        caps = [a["caption"] for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(caps) == len(set(caps)) == 5


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path, tiny_world):
    root, _ = tiny_world
    again = world.build_world(tmp_path / "again", seed=0, workers=2, **TINY)  # the worker count does not matter
    digest = tree_digest(root)
    assert len(digest) > 700
    assert tree_digest(tmp_path / "again") == digest
    assert again == json.loads((root / "world.json").read_text())
    world.build_world(tmp_path / "other", seed=1, workers=1, **TINY)
    other = tree_digest(tmp_path / "other")
    assert other.keys() == digest.keys()
    pngs = [k for k in digest if k.endswith(".png")]
    assert sum(other[k] != digest[k] for k in pngs) > 0.99 * len(pngs)
    assert other["shapes/split_zhou_WorldShapes.json"] == digest["shapes/split_zhou_WorldShapes.json"]


def test_rebuild_is_idempotent_and_parameter_changes_are_refused(tmp_path, monkeypatch):
    root = tmp_path / "world"
    first = world.build_world(root, **MICRO)
    marker = (root / "world.json").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(world_build, "_render_task", lambda *a: calls.append(a))
    assert world.build_world(root, **MICRO) == first
    assert calls == [] and (root / "world.json").stat().st_mtime_ns == marker
    with pytest.raises(world.WorldMismatchError, match=r"seed: 0 on disk, 3 requested"):
        world.build_world(root, seed=3, **MICRO)
    with pytest.raises(world.WorldMismatchError, match="image_size"):
        world.build_world(root, image_size=24, **MICRO)
    with pytest.raises(ValueError, match="seed must be non-negative"):
        world.build_world(root, seed=-1, **MICRO)
    monkeypatch.undo()
    # overwrite=True replaces the world; a missing file triggers a rebuild of the same world.
    replaced = world.build_world(root, seed=3, overwrite=True, **MICRO)
    assert replaced["params"]["seed"] == 3 and world.load_manifest(root)["params"]["seed"] == 3
    victim = next((root / "counts" / "images").rglob("*.png"))
    victim.unlink()
    world.build_world(root, seed=3, **MICRO)
    assert victim.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary folders left behind


def test_refuses_foreign_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(world.WorldMismatchError, match="not empty"):
        world.build_world(root, **MICRO)
    assert (root / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError):
        world.load_manifest(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert world.build_world(empty, **MICRO)["params"]["scale"] == MICRO["scale"]


def test_interrupted_build_leaves_no_world(tmp_path, monkeypatch):
    root = tmp_path / "world"
    real = world_build._render_task
    done = []

    def flaky(task, build_root):
        if len(done) == 40:
            raise RuntimeError("simulated crash")
        done.append(task)
        return real(task, build_root)

    monkeypatch.setattr(world_build, "_render_task", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        world.build_world(root, workers=1, **MICRO)
    assert len(done) == 40
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary build folder is gone too


def test_render_unlabeled_is_seeded_unlimited_and_never_a_split_image(tmp_path, tiny_world):
    root, _ = tiny_world
    size = TINY.get("image_size", 32)
    out = world.render_unlabeled("shapes", 130, tmp_path / "u", seed=0, image_size=size, workers=1)
    files = sorted((out / "images").iterdir())
    assert len(files) == 130 and files[0].name == "00000000.png"  # flat: no class in the name
    assert (out / "classnames.txt").read_text().split("\n")[:-1] == list(world.WORLD_DATASETS["shapes"].classnames)
    again = world.render_unlabeled("shapes", 130, tmp_path / "v", seed=0, image_size=size, workers=2)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted((again / "images").iterdir())]
    assert world.render_unlabeled("shapes", 130, out, seed=0, image_size=size) == out  # reused as it is
    split_images = {p.read_bytes() for p in (root / "shapes" / "images").rglob("*.png")}
    assert split_images and not split_images & {f.read_bytes() for f in files}
    other = world.render_unlabeled("shapes", 10, tmp_path / "w", seed=1, image_size=size, classes="base")
    assert {f.read_bytes() for f in (other / "images").iterdir()}.isdisjoint(f.read_bytes() for f in files[:10])
    with pytest.raises(world.WorldMismatchError, match="not empty"):
        world.render_unlabeled("shapes", 131, out, seed=0, image_size=size)
    with pytest.raises(world.WorldMismatchError, match="no world dataset 'shape'"):
        world.render_unlabeled("shape", 1, tmp_path / "x")
