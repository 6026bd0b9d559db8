"""Training-free and online test-time methods: TDA's caches and ZERO's votes against hand rules, episodic vs online
modes, exact resume after an interruption, the stream order, metrics, bad input, and two gloo ranks."""

from __future__ import annotations

import csv
import math
import operator
from pathlib import Path

import pytest
import torch

from promptkd.tta import build_model, get_tta_method
from promptkd.tta.online import OnlineBatch

CLASSES = ["red circle", "blue square", "green star", "yellow cross", "purple ring"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from test_tta import _toy_dataset

    return _toy_dataset(tmp_path_factory.mktemp("online"))


def _batch(
    n: int, n_views: int, n_cls: int, width: int, seed: int = 0, scale: float = 30.0, pull: float = 2.0
) -> OnlineBatch:
    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(n_cls, width, generator=g), dim=-1)
    features = torch.nn.functional.normalize(torch.randn(n, n_views, width, generator=g) + pull * text[0], dim=-1)
    return OnlineBatch(features, text, scale, scale * features @ text.t())


# --- TDA against the reference's rules, written out with lists as its runner does ---------------------------------


def _reference_tda(batch: OnlineBatch, cfg) -> torch.Tensor:
    """TDA's runner rules over a stream (dict of sorted lists per class, update before predicting)."""
    pos: dict[int, list] = {}
    neg: dict[int, list] = {}
    n_cls = batch.text.shape[0]

    def update(cache, pred, item, shots):
        if pred in cache:
            if len(cache[pred]) < shots:
                cache[pred].append(item)
            elif item[1] < cache[pred][-1][1]:
                cache[pred][-1] = item
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
        else:
            cache[pred] = [item]

    def cache_logits(feature, cache, alpha, beta, negative):
        keys = torch.stack([it[0] for c in sorted(cache) for it in cache[c]])
        if negative:
            probs = torch.stack([it[2] for c in sorted(cache) for it in cache[c]])
            values = ((probs > cfg.mask_lower) & (probs < cfg.mask_upper)).float()
        else:
            labels = torch.tensor([c for c in sorted(cache) for _ in cache[c]])
            values = torch.nn.functional.one_hot(labels, n_cls).float()
        return alpha * torch.exp(-beta * (1 - keys @ feature)) @ values

    out = []
    for b in range(batch.batch):
        logits = batch.clip_logits[b]
        if logits.shape[0] > 1:
            ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            keep = torch.argsort(ent, stable=True)[: int(logits.shape[0] * cfg.selection)]
            chosen = logits[keep]
            feature, clip = batch.features[b, keep].mean(0), chosen.mean(0)
            avg = torch.logsumexp(chosen.log_softmax(-1), 0) - math.log(len(keep))
            loss, probs = -(avg.exp() * avg).sum(), chosen.softmax(-1).mean(0)
        else:
            feature, clip = batch.features[b, 0], logits[0]
            loss, probs = -(clip.softmax(-1) * clip.log_softmax(-1)).sum(), clip.softmax(-1)
        pred = int(clip.argmax())
        update(pos, pred, (feature, float(loss)), cfg.pos_shots)
        if cfg.entropy_lower < float(loss) / math.log2(n_cls) < cfg.entropy_upper:
            update(neg, pred, (feature, float(loss), probs), cfg.neg_shots)
        final = clip + cache_logits(feature, pos, cfg.pos_alpha, cfg.pos_beta, False)
        if neg:
            final = final - cache_logits(feature, neg, cfg.neg_alpha, cfg.neg_beta, True)
        out.append(final)
    return torch.stack(out)


@pytest.mark.parametrize("n_views", [1, 20])
def test_tda_caches_follow_the_reference_rules(tiny_backbone, n_views):
    from promptkd.tta.methods.tda import TDAConfig

    model, _ = build_model(CLASSES, backbone=tiny_backbone)
    width = model.initial_text_features().shape[-1]
    # thresholds wide enough that both caches fill, 2 shots so that replacements happen within 24 samples
    cfg = TDAConfig(n_views=n_views, pos_shots=2, neg_shots=1, entropy_lower=0.0, entropy_upper=0.7)
    method = get_tta_method("tda")(model, cfg)
    method.mode = "online"
    batch = _batch(24, n_views, len(CLASSES), width, scale=100.0, pull=0.2)  # CLIP's scale, the reference's units
    got = torch.cat(
        [
            method.predict(
                OnlineBatch(
                    *(t[i : i + 6] for t in (batch.features,)),
                    batch.text,
                    batch.logit_scale,
                    batch.clip_logits[i : i + 6],
                )
            )
            for i in range(0, 24, 6)
        ]
    )
    torch.testing.assert_close(got, _reference_tda(batch, cfg), atol=1e-5, rtol=1e-5)
    assert int(torch.isfinite(method.state["neg_entropy"]).sum()) >= 1
    # clip_units: the same caches, their logits scaled by s/100 (s = 50 here)
    half = OnlineBatch(batch.features, batch.text, 50.0, batch.clip_logits / 2)
    plain = get_tta_method("tda")(model, TDAConfig(n_views=n_views, positive=False, negative=False)).predict(half)
    diffs = []
    for units in (False, True):
        scaled = get_tta_method("tda")(model, TDAConfig(n_views=n_views, pos_shots=2, neg_shots=1, clip_units=units))
        scaled.mode = "online"
        diffs.append(scaled.predict(half) - plain)
    torch.testing.assert_close(diffs[1], diffs[0] / 2, atol=1e-5, rtol=1e-5)
    # episodic: every sample sees only itself, so the order of the batch does not matter
    method.mode = "episodic"
    flipped = OnlineBatch(batch.features.flip(0), batch.text, batch.logit_scale, batch.clip_logits.flip(0))
    torch.testing.assert_close(method.predict(flipped).flip(0), method.predict(batch))


def test_zero_votes_and_greedy_tie_break():
    from promptkd.tta.methods.zero import zero_votes

    # 10 views, gamma 0.3 -> 3 voters: the 3 sharpest views; they vote classes 0, 1, 2 (a 3-way tie)
    logits = torch.zeros(1, 10, 4)
    logits[0, 0, 0] = logits[0, 1, 1] = logits[0, 2, 2] = 50.0
    logits[0, 3:, :] = torch.tensor([0.0, 0.0, 0.1, 0.2])  # flat views: argmax 3, not tied ...
    logits[0, 6] = torch.tensor([0.0, 0.3, 0.0, 0.2])  # ... until view 6 (from index 3 on) picks class 1
    votes = zero_votes(logits, 0.3)
    assert votes.tolist() == [[1.0, 2.0, 1.0, 0.0]]
    method_logits = (votes / votes.sum(-1, keepdim=True)).log()
    assert int(method_logits.argmax()) == 1


def test_zero_predicts_from_votes_on_a_model(tiny_backbone):
    model, _ = build_model(CLASSES, backbone=tiny_backbone)
    method = get_tta_method("zero")(model)
    views = torch.randn(2, 64, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    result = method.adapt(views)
    probs = result.logits.softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert torch.allclose(probs * 19, (probs * 19).round(), atol=1e-4)  # vote shares of int(64 * 0.3) = 19 voters


# --- runs: modes, order, resume ---------------------------------------------------------------------------------


def _config(toy, out, method="tda", sets=(), **kw):
    from promptkd.tta.run import resolve_tta_config

    base = {
        "method": method,
        "datasets": [str(toy)],
        "model": "pkd-tiny",
        "pretrained": "random",
        "batch_size": 2,
        "progress": False,
        "device": "cpu",
        "out": str(out),
        **kw,
    }
    return resolve_tta_config(None, ["progress_every_s=0", *sets], base)


def _rows(folder: Path, pattern: str = "*-predictions.csv") -> list[list[str]]:
    (path,) = folder.glob(pattern)
    return list(csv.reader(path.open()))


def _run(config, **kw):
    from promptkd.tta.run import run_tta

    torch.manual_seed(0)  # the random-weight tiny model
    return run_tta(config, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "sets"), [("tda", ()), ("tpt", ("method.n_views=4",))])
def test_online_run_resumes_exactly_after_an_interruption(toy, tmp_path, monkeypatch, method, sets):
    full = _run(_config(toy, tmp_path / "full", method, sets, mode="online"))
    cls = get_tta_method(method)
    original, calls = cls.adapt, {"n": 0}

    def interrupted(self, views):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, views)

    monkeypatch.setattr(cls, "adapt", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(_config(toy, tmp_path / "cut", method, sets, mode="online"))
    assert list((tmp_path / "cut" / "tta-progress").glob("*.pt"))
    monkeypatch.setattr(cls, "adapt", original)
    counted = {"n": 0}

    def counting(self, views):
        counted["n"] += len(views)
        return original(self, views)

    monkeypatch.setattr(cls, "adapt", counting)
    resumed = _run(_config(toy, tmp_path / "cut", method, sets, mode="online"))
    assert counted["n"] == 15 - 3 * 2  # only the images after the 3 saved batches were adapted again
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    a, b = full.results[0], resumed.results[0]
    assert a["metrics"]["acc1"] == b["metrics"]["acc1"] and a["metrics"]["ece"] == b["metrics"]["ece"]
    assert a["stream"] == b["stream"] and a["method"] == f"{method}-online"
    assert not (tmp_path / "cut" / "tta-progress").exists()


@pytest.mark.slow
def test_online_order_is_seeded_recorded_and_orders_give_a_spread(toy, tmp_path):
    from promptkd.results import aggregate
    from promptkd.tta.run import stream_order

    outcome = _run(_config(toy, tmp_path / "o", "tda", mode="online", orders=3))
    streams = [r["stream"] for r in outcome.results]
    assert [s["order_seed"] for s in streams] == [0, 1, 2] and len({s["order_sha256"] for s in streams}) == 3
    for r in outcome.results:
        m = r["metrics"]
        assert m["seconds_per_image"] > 0 and m["peak_memory_mb"] >= 0 and "ece" in m and "base_acc1" in m
    rows = [row for row in aggregate(outcome.results).rows if row.method == "tda-online"]
    assert len(rows) == 1 and rows[0].metrics["acc1"].n == 3 and "ms_per_image" in rows[0].metrics
    from promptkd.results import format_markdown

    table = format_markdown(aggregate(outcome.results))
    assert "ms_per_image" in table and "peak_memory_mb" in table and " ± " in table  # the spread over 3 orders
    items = [type("I", (), {"path": f"img{i}"})() for i in range(20)]
    assert stream_order(items, "online", 5) == stream_order(items, "online", 5) != stream_order(items, "online", 6)
    assert stream_order(items, "episodic", 5) == list(range(20))
    assert sorted(stream_order(items, "online", 5)) == list(range(20))


def test_tpt_online_carries_prompts_and_differs_from_episodic(tiny_backbone):
    from promptkd.tta import TTAConfig

    model, _ = build_model(CLASSES, backbone=tiny_backbone)
    method = get_tta_method("tpt")(model, TTAConfig(n_views=4, lr=0.05))
    views = torch.randn(3, 4, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    episodic = method.adapt(views)
    assert method.state_dict() == {}
    method.mode = "online"
    online = method.adapt(views)
    torch.testing.assert_close(online.params["ctx"][0], episodic.params["ctx"][0])  # the first image: same start
    assert not torch.allclose(online.params["ctx"][2], episodic.params["ctx"][2])
    torch.testing.assert_close(method.state_dict()["prompt.ctx"], online.params["ctx"][2:3])


# --- bad input: one message, exit 2, before any work, nothing lost ----------------------------------------------


def _interrupt_after(monkeypatch, cls, batches: int):
    """Make ``cls.adapt`` raise KeyboardInterrupt at call ``batches + 1``; returns the original."""
    original, calls = cls.adapt, {"n": 0}

    def interrupted(self, views):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return original(self, views)

    monkeypatch.setattr(cls, "adapt", interrupted)
    return original


def test_resume_with_another_order_method_or_checkpoint_is_refused(toy, tiny_backbone, tmp_path, monkeypatch, capsys):
    from promptkd.cli.main import main
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from
    from promptkd.tta.methods.tda import TDA

    cls = get_method("coop")
    coop = cls(tiny_backbone, CLASSES, config_from(cls, {"n_ctx": 4, "ctx_init": ""}))
    checkpoint = coop.save(tmp_path / "coop")
    out = tmp_path / "run"
    common = ["--datasets", str(toy), "--no-progress", "--device", "cpu", "--batch-size", "2", "--out", str(out)]
    common += ["--base", str(checkpoint), "--set", "progress_every_s=0"]
    original = _interrupt_after(monkeypatch, TDA, 2)
    assert main(["tta", "--method", "tda", *common]) == 130  # Ctrl-C after 2 batches
    monkeypatch.setattr(TDA, "adapt", original)
    saved = {p.name: p.read_bytes() for p in (out / "tta-progress").iterdir()}
    assert any(name.endswith(".pt") for name in saved)
    with torch.no_grad():
        coop.learner.text.ctx.add_(0.01)
    other = coop.save(tmp_path / "other")
    refusals = [
        (["--method", "tda", "--seed", "1"], "seed: 0 then, 1 now"),  # another stream order
        (["--method", "zero", "--mode", "online"], 'method: "tda" then, "zero" now'),
        (["--method", "tda", "--base", str(other)], "base_sha256"),  # another checkpoint (the last --base wins)
        (["--method", "tda", "--set", "method.pos_shots=5"], "method_config.pos_shots: 3 then, 5 now"),  # nested
    ]
    for argv, message in refusals:
        assert main(["tta", *common, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "--overwrite" in err, argv
    assert {p.name: p.read_bytes() for p in (out / "tta-progress").iterdir()} == saved  # nothing lost
    assert main(["tta", "--method", "tda", *common]) == 0  # the same command resumes and completes it
    assert not (out / "tta-progress").exists()


def test_impossible_cache_or_views_and_unadaptable_checkpoints_are_refused(toy, tiny_backbone, tmp_path, capsys):
    from promptkd.cli.main import main
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    out = tmp_path / "bad"
    common = [
        "--datasets",
        str(toy),
        "--model",
        "pkd-tiny",
        "--pretrained",
        "random",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    cases = [
        (["--method", "tda", "--set", "method.pos_shots=0"], "pos_shots"),
        (["--method", "tda", "--set", "method.neg_shots=100000000"], "lower method.pos_shots"),
        (["--method", "tda", "--set", "method.n_views=4"], "keep no view"),
        (["--method", "zero", "--set", "method.n_views=2"], "no view to vote"),
        (["--method", "tda", "--mode", "episodic", "--orders", "3"], "--orders 3 needs --mode online"),
    ]
    for argv, message in cases:
        assert main(["tta", *common, *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    cls = get_method("coop")
    csc = cls(tiny_backbone, CLASSES, config_from(cls, {"n_ctx": 2, "ctx_init": "", "class_specific": True}))
    path = csc.save(tmp_path / "csc")
    for method in ("tda", "zero", "tpt"):
        argv = ["tta", "--method", method, "--datasets", str(toy), "--base", str(path), "--out", str(out)]
        assert main([*argv, "--no-progress", "--device", "cpu"]) == 2
        assert "class-specific" in capsys.readouterr().err
    assert not out.exists() or not list(out.glob("*.json"))


def test_tda_and_zero_on_a_coop_checkpoint(toy, tiny_backbone, tmp_path):
    from promptkd.methods import get_method
    from promptkd.methods.base import config_from

    cls = get_method("coop")
    coop = cls(tiny_backbone, CLASSES, config_from(cls, {"n_ctx": 4, "ctx_init": ""}))
    with torch.no_grad():
        coop.learner.text.ctx.normal_(0, 0.1)
    path = coop.save(tmp_path / "coop")
    for method, sets in (("tda", ()), ("zero", ("method.n_views=8",))):
        outcome = _run(_config(toy, tmp_path / method, method, sets, base=str(path), model=None, pretrained=None))
        assert "coop prompts" in outcome.results[0]["base_prompts"]
        assert outcome.results[0]["num_samples"] == 15


def test_training_free_methods_run_on_a_promptkd_student_with_stored_features(tiny_backbone, tmp_path):
    import torch.nn.functional as F

    from promptkd.distill.teacher import TeacherFeatures
    from promptkd.methods.promptkd import PromptKD, PromptKDConfig
    from promptkd.tta.model import StudentFeatures, TTAModelError

    torch.manual_seed(0)
    stored = TeacherFeatures(F.normalize(torch.randn(5, 128), dim=-1), 50.0, CLASSES, {"method": "zeroshot"})
    student = PromptKD(tiny_backbone, CLASSES, PromptKDConfig(vision_depth=2), features=stored).eval()
    model = StudentFeatures(student)
    views = torch.randn(3, 1, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    off = get_tta_method("tda")(model, get_tta_method("tda").config_class(positive=False, negative=False))
    with torch.no_grad():
        expected = student.logits(views[:, 0])
    torch.testing.assert_close(off.adapt(views).logits, expected)  # caches off: the student's own prediction
    tda = get_tta_method("tda")(model)
    tda.mode = "online"
    assert tda.adapt(views).logits.shape == (3, 5) and tda.diagnostics()["pos"] == 3
    path = student.save(tmp_path / "student")
    with pytest.raises(TTAModelError, match="training-free methods"):  # TPT has no text prompts to tune there
        build_model(CLASSES, checkpoint=str(path))


@pytest.mark.slow
def test_two_gloo_ranks_each_adapt_their_own_shard_online(toy, tmp_path):
    import socket

    import torch.multiprocessing as mp

    from tta_helpers import tta_ddp_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    mp.spawn(tta_ddp_worker, args=(2, port, str(toy), str(out), "tda", "online"), nprocs=2, join=True)
    (result,) = out.glob("tda-online-*.json")
    import json

    record = json.loads(result.read_text())
    assert record["stream"]["world_size"] == 2 and record["num_samples"] == 15
    # each rank's stream: positions rank, rank + 2, ... of the seeded order, with its own caches
    from promptkd.data.datasets import resolve_dataset
    from promptkd.tta.run import stream_order
    from promptkd.tta.views import TTAViewDataset, ViewConfig

    torch.manual_seed(0)
    from promptkd.backbones import load_backbone

    backbone = load_backbone("pkd-tiny", "random", device="cpu")
    items = resolve_dataset(str(toy), None).split("test")
    model, _ = build_model(resolve_dataset(str(toy), None).classnames, backbone=backbone)
    order = stream_order(items, "online", 0)
    dataset = TTAViewDataset(items, backbone.preprocess, ViewConfig(n_views=1, seed=0))
    expected = {}
    for rank in range(2):
        method = get_tta_method("tda")(model)
        method.mode = "online"
        shard = order[rank::2]
        for start in range(0, len(shard), 2):
            chunk = shard[start : start + 2]
            logits = method.adapt(torch.stack([dataset[i][0] for i in chunk])).logits
            expected.update({items[i].path: model.classnames[int(row.argmax())] for i, row in zip(chunk, logits)})
    rows = _rows(out)
    assert [r[0] for r in rows[1:]] == [items[i].path for i in order]  # predictions listed in stream order
    assert {r[0]: r[2] for r in rows[1:]} == expected
