"""The teacher's cached soft labels (FKD): exact replay, what the cache refuses, and what it survives."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from promptkd.checkpoints import load_checkpoint
from promptkd.distill.cache import TeacherCache, TeacherCacheError, ViewRecipe
from test_promptkd import (  # noqa: F401 (fixtures)
    CLASSES,
    _cli,
    _write_split_folder,
    teacher,
    teacher_backbone,
    teacher_ckpt,
)

SETS = ["--set", "train.epochs=3", "train.batch_size=4", "train.progress=false", "method.vision_depth=2"]


def _identity(num_classes=4, **changes):
    base = {
        "teacher": {"method": "promptsrc", "prompts_sha256": "abc"},
        "features_sha256": "f" * 64,
        "classnames_sha256": "c" * 64,
        "num_classes": num_classes,
        "logit_scale": 100.0,
        "recipe": ViewRecipe(32, (0.5,) * 3, (0.5,) * 3).describe(),
    }
    return {**base, **changes}


def _prompts(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "prompts")[0]


@pytest.fixture(scope="module")
def student_weights(tiny_backbone, tmp_path_factory) -> str:
    """pkd-tiny's random weights in a file: every run's student starts from the same weights."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("student") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture()
def toy(tmp_path, student_weights) -> list[str]:
    _write_split_folder(tmp_path / "toy")
    return ["--student-model", "pkd-tiny", "--student-pretrained", student_weights, "--dataset", str(tmp_path / "toy")]


def test_views_are_fixed_by_recipe_key_and_view_and_each_image_cycles_through_them():
    recipe = ViewRecipe(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), scale=(0.3, 1.0), views=4, seed=2)
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    image.paste((10, 200, 10), (0, 0, 20, 15))
    a = recipe.crop(image, "x.png", 1)
    assert a.shape == (3, 16, 16) and torch.equal(a, recipe.crop(image, "x.png", 1))
    assert not torch.equal(a, recipe.crop(image, "x.png", 2))
    visited = [recipe.view_number("x.png", epoch, run_seed=7) for epoch in range(4)]
    assert sorted(visited) == [0, 1, 2, 3]  # four epochs, four different views


def test_full_logits_round_trip_exactly_and_topk_keeps_the_top_probabilities(tmp_path):
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3
    keys = [f"img{i}#0" for i in range(6)]
    full = TeacherCache(tmp_path / "full", _identity(), flush_every=4)
    full.put(keys[:4], logits[:4])  # a chunk is written once 4 rows wait
    full.put(keys[4:], logits[4:])
    full.flush()
    again = TeacherCache(tmp_path / "full", _identity())
    found, got = again.get([*keys, "unknown#0"])
    assert found.tolist() == [True] * 6 + [False] and torch.equal(got[:6], logits)
    assert len(list((tmp_path / "full").glob("chunk-*.safetensors"))) == 2  # 4 + 2 rows

    top = TeacherCache(tmp_path / "top", _identity(), storage="topk", topk=2, dtype="fp16")
    top.put(keys, logits)
    top.flush()
    _, approx = TeacherCache(tmp_path / "top", _identity(), storage="topk", topk=2, dtype="fp16").get(keys)
    p, q = logits.softmax(-1), approx.softmax(-1)
    best = logits.topk(2, dim=-1).indices
    assert torch.allclose(p.gather(1, best), q.gather(1, best), atol=2e-3)  # the stored top-2 keep their mass
    assert torch.allclose(q.sum(-1), torch.ones(6))
    # What a run trains on when it computes logits itself is exactly what a later read returns.
    assert torch.equal(top.as_stored(logits), approx) and torch.equal(full.as_stored(logits), logits)


def test_cache_refuses_another_teacher_features_classes_recipe_or_storage(tmp_path):
    TeacherCache(tmp_path / "c", _identity()).flush()
    cases = {
        "another teacher": _identity(teacher={"method": "promptsrc", "prompts_sha256": "zzz"}),
        "other stored class features": _identity(features_sha256="0" * 64),
        "another class list": _identity(classnames_sha256="1" * 64),
        "another view recipe": _identity(recipe=ViewRecipe(32, (0.5,) * 3, (0.5,) * 3, views=3).describe()),
    }
    for reason, identity in cases.items():
        with pytest.raises(TeacherCacheError, match=reason):
            TeacherCache(tmp_path / "c", identity)
    with pytest.raises(TeacherCacheError, match="another storage form"):
        TeacherCache(tmp_path / "c", _identity(), storage="topk", topk=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(TeacherCacheError, match="not empty and holds no teacher cache"):
        TeacherCache(tmp_path / "mine", _identity())
    with pytest.raises(TeacherCacheError, match="store the top-k"):
        TeacherCache(tmp_path / "big", _identity(num_classes=5000))


def test_damaged_or_half_written_chunks_are_never_served(tmp_path, caplog):
    cache = TeacherCache(tmp_path / "c", _identity(), flush_every=2)
    cache.put(["a#0", "b#0"], torch.arange(8.0).view(2, 4))  # one chunk per 2 rows
    cache.put(["c#0", "d#0"], torch.arange(8.0, 16.0).view(2, 4))
    chunks = sorted((tmp_path / "c").glob("chunk-*.safetensors"))
    data = bytearray(chunks[0].read_bytes())
    data[-2] ^= 0xFF  # a flipped bit in the tensor bytes
    chunks[0].write_bytes(bytes(data))
    (tmp_path / "c" / ".chunk-torn.safetensors.tmp").write_bytes(b"half")  # a write a kill interrupted
    with caplog.at_level(logging.WARNING):
        found, got = TeacherCache(tmp_path / "c", _identity()).get(["a#0", "b#0", "c#0", "d#0"])
    assert found.tolist() == [False, False, True, True] and torch.equal(got[2:], torch.arange(8.0, 16.0).view(2, 4))
    assert "ignoring damaged chunk" in caplog.text


def test_unwritable_or_full_cache_keeps_the_run_going(tmp_path, monkeypatch, caplog):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    cache = TeacherCache(tmp_path / "c", _identity(), flush_every=1)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with caplog.at_level(logging.WARNING):
        cache.put(["a#0"], torch.ones(1, 4))
        cache.put(["b#0"], torch.ones(1, 4))
    assert not cache.writable and "No space left on device" in caplog.text and "live teacher" in caplog.text
    monkeypatch.undo()
    limited = TeacherCache(tmp_path / "d", _identity(), flush_every=1, max_gb=1e-9)
    with caplog.at_level(logging.WARNING):
        limited.put(["a#0"], torch.ones(1, 4))
    assert not limited.writable and "size limit" in caplog.text


def test_cached_run_equals_the_live_teacher_run_bit_for_bit(teacher_ckpt, toy, tmp_path, monkeypatch):  # noqa: F811
    from promptkd.distill.teacher import Teacher

    common = ["--teacher", str(teacher_ckpt), *toy, "--teacher-cache", str(tmp_path / "cache"), "--views", "3"]
    assert _cli([*common, "--out", str(tmp_path / "live"), *SETS]) == 0  # cold: the teacher runs, logits stored
    live = yaml.safe_load((tmp_path / "live" / "config.yaml").read_text())["teacher_cache"]
    # 12 images, 3 epochs, 3 views: every image visits each of its views once, each computed once and stored.
    assert live["misses"] == live["written"] == 12 * 3 and live["hits"] == 0

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher's image tower ran although every view was cached")

    monkeypatch.setattr(Teacher, "image_features", no_teacher)
    assert _cli([*common, "--out", str(tmp_path / "cached"), *SETS]) == 0
    cached, reference = _prompts(tmp_path / "cached"), _prompts(tmp_path / "live")
    assert cached.keys() == reference.keys()
    for key in reference:
        assert torch.equal(cached[key], reference[key]), key
    # Another seed and another learning rate draw from the same stored views: still no teacher forward.
    assert _cli([*common, "--out", str(tmp_path / "sweep"), "--seed", "2", *SETS, "train.lr=0.01"]) == 0
    result = json.loads(next((tmp_path / "sweep").glob("promptkd-*-base-*.json")).read_text())
    assert result["teacher_cache"]["misses"] == 0 and result["teacher_cache"]["hits"] == 3 * 12


def test_a_cache_of_another_teacher_is_refused_before_training(teacher_ckpt, toy, tmp_path):  # noqa: F811
    common = [*toy, "--teacher-cache", str(tmp_path / "cache"), "--views", "2", *SETS]
    assert _cli(["--teacher", str(teacher_ckpt), "--out", str(tmp_path / "a"), *common]) == 0
    with pytest.raises(TeacherCacheError, match="another teacher"):
        _cli(
            [
                "--teacher-model",
                "pkd-tiny-wide",
                "--teacher-pretrained",
                "random",
                "--out",
                str(tmp_path / "b"),
                *common,
            ]
        )
    with pytest.raises(TeacherCacheError, match="another view recipe"):
        _cli(["--teacher", str(teacher_ckpt), "--out", str(tmp_path / "c"), *common, "train.crop_scale=[0.9,1.0]"])


def test_teacher_cache_command_fills_ahead_and_distill_then_never_runs_the_teacher(
    teacher_ckpt,  # noqa: F811 (the fixture)
    toy,
    tmp_path,
    monkeypatch,
    capsys,
):
    from promptkd.cli.main import main
    from promptkd.distill.teacher import Teacher

    common = ["--teacher", str(teacher_ckpt), *toy, "--teacher-cache", str(tmp_path / "cache"), "--views", "3"]
    fill = ["teacher-cache", *common, "--out", str(tmp_path / "fill"), "--batch-size", "5", "--no-progress", *SETS]
    assert main(fill) == 0
    summary = json.loads((tmp_path / "fill" / "teacher_cache.json").read_text())
    assert summary["entries"] == summary["written"] == 12 * 3
    assert main(fill) == 0  # everything stored: nothing is computed again
    assert json.loads((tmp_path / "fill" / "teacher_cache.json").read_text())["written"] == 0
    assert "36 views stored (0 new)" in capsys.readouterr().out

    monkeypatch.setattr(Teacher, "image_features", lambda *a, **k: pytest.fail("the teacher ran"))
    assert _cli([*common, "--out", str(tmp_path / "run"), *SETS]) == 0
    result = json.loads(next((tmp_path / "run").glob("promptkd-*-base-*.json")).read_text())
    assert result["teacher_cache"]["hits"] == 36 and result["teacher_cache"]["misses"] == 0
    monkeypatch.undo()
    live = [*common[:-4], "--teacher-cache", str(tmp_path / "cold"), "--views", "3"]
    assert _cli([*live, "--out", str(tmp_path / "live"), *SETS]) == 0  # the teacher in the loop, same views
    filled, reference = _prompts(tmp_path / "run"), _prompts(tmp_path / "live")
    for key in reference:  # logits computed ahead in other batches differ from the live ones by float rounding only
        assert torch.allclose(filled[key], reference[key], rtol=1e-5, atol=1e-7), key
    assert main(["teacher-cache", *common, "--out", str(tmp_path / "f2"), "--batch-size", "0"]) == 2


def test_random_teacher_and_student_are_functions_of_the_seed(toy, tmp_path):
    """`--teacher-pretrained random` twice with one seed is one teacher: its cache serves the second run (random
    weights drawn without a seed would change the stored features, and the cache would rightly refuse them)."""
    random_pair = ["--teacher-model", "pkd-tiny-wide", "--teacher-pretrained", "random", *toy[:2]]
    random_pair += ["--student-pretrained", "random", *toy[4:], "--teacher-cache", str(tmp_path / "cache")]
    assert _cli([*random_pair, "--views", "2", "--out", str(tmp_path / "a"), *SETS]) == 0
    assert _cli([*random_pair, "--views", "2", "--out", str(tmp_path / "b"), *SETS]) == 0
    first, second = _prompts(tmp_path / "a"), _prompts(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)
    result = json.loads(next((tmp_path / "b").glob("promptkd-*-base-*.json")).read_text())
    assert result["teacher_cache"]["misses"] == 0


def test_a_lossy_cache_trains_the_same_student_cold_as_warm(teacher_ckpt, toy, tmp_path):  # noqa: F811
    """Top-k fp16: the run that fills the cache trains on the stored form, so the run that reads it (or a run
    resumed half-way through filling it) trains the same student; and the student differs from full logits'."""
    common = ["--teacher", str(teacher_ckpt), *toy, "--views", "3", *SETS]
    lossy = ["--teacher-cache", str(tmp_path / "top"), "--teacher-cache-topk", "2", "--teacher-cache-dtype", "fp16"]
    assert _cli([*common, *lossy, "--out", str(tmp_path / "cold")]) == 0
    assert _cli([*common, *lossy, "--out", str(tmp_path / "warm")]) == 0
    assert _cli([*common, "--teacher-cache", str(tmp_path / "full"), "--out", str(tmp_path / "full-run")]) == 0
    cold, warm, full = (_prompts(tmp_path / name) for name in ("cold", "warm", "full-run"))
    assert all(torch.equal(cold[k], warm[k]) for k in cold)
    assert not all(torch.equal(cold[k], full[k]) for k in cold)


# --- bound to the content of each image ---------------------------------------------------------------------------
def _repaint(folder: Path) -> None:
    """Same file names, other images: every PNG below ``folder`` replaced by its negative."""
    for path in sorted(folder.rglob("*.png")):
        with Image.open(path) as image:
            negative = Image.eval(image.convert("RGB"), lambda v: 255 - v)
        negative.save(path)


def _teacher_cache_record(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["teacher_cache"]


@pytest.mark.slow
def test_a_cache_filled_on_other_images_with_the_same_names_recomputes_them_and_says_so(
    teacher_ckpt,  # noqa: F811 (the fixture)
    toy,
    tmp_path,
    caplog,
):
    import shutil

    shutil.copytree(tmp_path / "toy", tmp_path / "other")
    _repaint(tmp_path / "other")  # folder B: the same 12 file names (and class list), other pictures
    common = ["--teacher", str(teacher_ckpt), *toy[:4], "--views", "1", "--no-eval"]
    sets = [*SETS, "train.epochs=1"]
    on = {name: ["--dataset", str(tmp_path / name)] for name in ("toy", "other")}
    cache = ["--teacher-cache", str(tmp_path / "cache")]
    assert _cli([*common, *on["toy"], *cache, "--out", str(tmp_path / "a"), *sets]) == 0
    with caplog.at_level(logging.WARNING):
        assert _cli([*common, *on["other"], *cache, "--out", str(tmp_path / "b"), *sets]) == 0
    record = _teacher_cache_record(tmp_path / "b")
    assert record["hits"] == 0 and record["misses"] == record["content_changed"] == 12 and record["written"] == 12
    assert "12 entries recomputed: image content changed" in caplog.text
    # the student of folder B trained on B's soft labels: the same as with a cache of its own
    fresh = ["--teacher-cache", str(tmp_path / "fresh")]
    assert _cli([*common, *on["other"], *fresh, "--out", str(tmp_path / "b-alone"), *sets]) == 0
    mixed, alone = _prompts(tmp_path / "b"), _prompts(tmp_path / "b-alone")
    assert all(torch.equal(mixed[k], alone[k]) for k in alone)
    # nothing stored was lost: folder A's rows are still served
    assert _cli([*common, *on["toy"], *cache, "--out", str(tmp_path / "a2"), *sets]) == 0
    assert _teacher_cache_record(tmp_path / "a2")["misses"] == 0


@pytest.mark.slow
def test_streamed_shard_members_are_bound_to_their_bytes(teacher_ckpt, student_weights, tmp_path, monkeypatch):  # noqa: F811
    from engine_helpers import make_shards
    from promptkd.cli.main import main
    from promptkd.distill.teacher import Teacher

    make_shards(tmp_path / "a", n_shards=2, per_shard=4, seed=0)
    make_shards(tmp_path / "b", n_shards=2, per_shard=4, seed=1)  # the same member names, other pictures
    (tmp_path / "classes.txt").write_text("\n".join(["red star", "blue ring", "green cross", "yellow moon"]) + "\n")
    common = ["--teacher", str(teacher_ckpt), "--student-model", "pkd-tiny", "--student-pretrained", student_weights]
    common += ["--classnames", str(tmp_path / "classes.txt"), "--lanes", "2", "--views", "1"]
    common += ["--teacher-cache", str(tmp_path / "cache"), *SETS, "train.epochs=1"]
    shards = {name: ["--unlabeled-shards", str(tmp_path / name / "shard-{000..001}.tar")] for name in "ab"}
    fill = ["teacher-cache", *shards["a"], "--out", str(tmp_path / "fill"), "--no-progress", *common]
    assert main(fill) == 0
    with monkeypatch.context() as patched:  # a fill's fingerprints (member bytes) are the stream's
        patched.setattr(Teacher, "image_features", lambda *a, **k: pytest.fail("the teacher ran"))
        assert _cli([*shards["a"], "--out", str(tmp_path / "warm"), *common]) == 0
    assert _teacher_cache_record(tmp_path / "warm")["misses"] == 0
    assert _cli([*shards["b"], "--out", str(tmp_path / "other"), *common]) == 0
    record = _teacher_cache_record(tmp_path / "other")
    assert record["hits"] == 0 and record["content_changed"] == 8


# --- inductive runs -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_inductive_runs_cache_the_base_class_logits(teacher_ckpt, toy, tmp_path, monkeypatch):  # noqa: F811
    from promptkd.cli.main import main
    from promptkd.distill.teacher import Teacher

    common = ["--teacher", str(teacher_ckpt), *toy, "--views", "1", "--no-eval", *SETS, "train.epochs=1"]
    inductive = [*common, "--mode", "inductive", "--teacher-cache", str(tmp_path / "cache")]
    assert _cli([*inductive, "--out", str(tmp_path / "cold")]) == 0  # the teacher runs, base-class logits stored
    record = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert record["num_classes"] == 2  # the base half of 4 classes
    with monkeypatch.context() as patched:
        patched.setattr(Teacher, "image_features", lambda *a, **k: pytest.fail("the teacher ran"))
        assert _cli([*inductive, "--out", str(tmp_path / "warm")]) == 0
    cold, warm = _prompts(tmp_path / "cold"), _prompts(tmp_path / "warm")
    assert all(torch.equal(cold[k], warm[k]) for k in cold)
    with pytest.raises(TeacherCacheError, match="another class list"):  # a transductive run scores all 4 classes
        _cli([*common, "--teacher-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "all")])
    fill = ["teacher-cache", *inductive[:-2], "--teacher-cache", str(tmp_path / "filled"), "--no-progress"]
    assert main([*fill, "--mode", "inductive", "--out", str(tmp_path / "fill")]) == 0
    assert json.loads((tmp_path / "fill" / "teacher_cache.json").read_text())["entries"] == 2 * 3  # base images


# --- several writers, damage and repair -----------------------------------------------------------------------------
def test_ranks_creating_one_cache_folder_at_once_all_open_it(tmp_path):
    import threading

    half = tmp_path / "half"
    half.mkdir()
    (half / ".cache.json.0-1a2b3c4d.tmp").write_text("{")  # rank 0 half-way through writing the record
    TeacherCache(half, _identity())
    start, errors = threading.Barrier(6), []

    def rank() -> None:
        start.wait()
        try:
            TeacherCache(tmp_path / "race", _identity()).flush()
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=rank) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and [p.name for p in (tmp_path / "race").iterdir()] == ["cache.json"]


def test_rows_of_a_damaged_chunk_are_stored_again_so_the_cache_is_repaired(tmp_path):
    cache = TeacherCache(tmp_path / "c", _identity(), flush_every=2)
    cache.put(["a#0", "b#0"], torch.arange(8.0).view(2, 4))
    cache.put(["c#0", "d#0"], torch.arange(8.0, 16.0).view(2, 4))
    first = sorted((tmp_path / "c").glob("chunk-*.safetensors"))[0]
    data = bytearray(first.read_bytes())
    data[-2] ^= 0xFF
    first.write_bytes(bytes(data))
    again = TeacherCache(tmp_path / "c", _identity(), flush_every=2)
    found, _ = again.get(["a#0", "b#0", "c#0", "d#0"])
    assert found.tolist() == [False, False, True, True] and again.stats["bad_chunks"] == 1
    again.put(["a#0", "b#0"], -torch.arange(8.0).view(2, 4))  # recomputed: stored again
    repaired = TeacherCache(tmp_path / "c", _identity())
    found, got = repaired.get(["a#0", "b#0", "c#0", "d#0"])
    assert found.all() and torch.equal(got[:2], -torch.arange(8.0).view(2, 4)) and repaired.stats["bad_chunks"] == 0
    assert len(list((tmp_path / "c").glob("damaged-chunk-*"))) == 1  # set aside, not deleted


def test_a_programming_error_while_reading_a_chunk_is_not_taken_for_damage(tmp_path, monkeypatch):
    from promptkd.distill import cache as cache_module

    cache = TeacherCache(tmp_path / "c", _identity())
    cache.put(["a#0"], torch.ones(1, 4))
    cache.flush()

    def broken(tensors):
        raise TypeError("a bug, not a damaged file")

    monkeypatch.setattr(cache_module, "_tensor_digest", broken)
    with pytest.raises(TypeError, match="a bug"):
        TeacherCache(tmp_path / "c", _identity()).get(["a#0"])


@pytest.mark.slow
def test_teacher_cache_command_repairs_a_damaged_cache_and_refuses_a_place_it_cannot_store(
    teacher_ckpt,  # noqa: F811 (the fixture)
    toy,
    tmp_path,
    capsys,
):
    from promptkd.cli.main import main

    common = ["teacher-cache", "--teacher", str(teacher_ckpt), *toy, "--views", "1", "--no-progress", *SETS]
    fill = [*common, "--teacher-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "fill")]
    assert main(fill) == 0
    (chunk,) = (tmp_path / "cache").glob("chunk-*.safetensors")
    chunk.write_bytes(chunk.read_bytes()[:-8])  # a torn chunk: its 12 rows are lost
    assert main(fill) == 0
    summary = json.loads((tmp_path / "fill" / "teacher_cache.json").read_text())
    assert summary["written"] == 12 and summary["bad_chunks"] == 1
    assert main(fill) == 0  # repaired: nothing left to compute
    assert json.loads((tmp_path / "fill" / "teacher_cache.json").read_text())["written"] == 0
    capsys.readouterr()
    for where, limit in (("/proc/promptkd-cache", []), (str(tmp_path / "tiny"), ["--teacher-cache-max-gb", "1e-9"])):
        assert main([*common, "--teacher-cache", where, *limit, "--out", str(tmp_path / "f2")]) == 2
        err = capsys.readouterr().err
        assert where in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    with pytest.raises(TeacherCacheError, match="cannot be written"):  # the same, from Python
        TeacherCache("/proc/promptkd-cache", _identity(), must_write=True)
