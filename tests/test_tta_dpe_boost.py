"""DPE and BoostAdapter: their rules pinned on fixed tensors (hand-computed values), then end to end via the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from promptkd.tta.methods.boostadapter import BoostConfig, BoostState, FifoCache, boost_adapt_one
from promptkd.tta.methods.dpe import (
    DPEConfig,
    DPEState,
    PriorityCache,
    adamw_fresh_step,
    dpe_adapt_one,
    info_nce,
    prototype_cache_logits,
    summarise_views,
)


def entropy2(a: float, b: float) -> float:
    """H(softmax([a, b])) in nats."""
    p = 1 / (1 + math.exp(b - a))
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_priority_cache_keeps_lowest_scores_and_earlier_ties():
    cache = PriorityCache(n_classes=2, capacity=2, dim=1)
    for value, score in [(1.0, 0.5), (2.0, 0.3), (3.0, 0.4), (4.0, 0.3), (5.0, 0.9)]:
        cache.insert(1, torch.tensor([value]), score)
    assert cache.keys[1].flatten().tolist() == [2.0, 4.0]  # 0.3 (first), 0.3 (tie: after it); 0.4 pushed out
    assert cache.scores[1].tolist() == pytest.approx([0.3, 0.3])
    assert cache.valid.tolist() == [[False, False], [True, True]]
    cache.insert(0, torch.tensor([7.0]), 0.1)
    protos, classes = cache.prototypes()
    assert classes.tolist() == [0, 1] and protos.flatten().tolist() == [7.0, 3.0]
    wide = cache.widened(3)
    wide.insert(1, torch.tensor([6.0]), 0.35)
    assert wide.keys[1].flatten().tolist() == [2.0, 4.0, 6.0] and cache.keys[1].flatten().tolist() == [2.0, 4.0]


def test_fifo_cache_drops_the_oldest():
    cache = FifoCache(n_classes=2, capacity=2, dim=1)
    for value in [1.0, 2.0, 3.0]:
        cache.insert(0, torch.tensor([value]), torch.tensor([value, 0.0]))
    assert cache.keys[0].flatten().tolist() == [2.0, 3.0] and cache.probs[0, :, 0].tolist() == [2.0, 3.0]
    assert cache.valid.tolist() == [[True, True], [False, False]]


def test_prototype_cache_logits_and_info_nce_by_hand():
    logits = prototype_cache_logits(
        torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 2]), 3, 2.0, 5.0
    )
    assert logits.tolist() == pytest.approx([2.0, 0.0, 2 * math.exp(-5)])
    eye = torch.eye(2)
    assert float(info_nce(eye * 3, eye, 0.5)) == pytest.approx(math.log(1 + math.exp(-2)))


def test_adamw_fresh_step_equals_a_new_torch_adamw():
    torch.manual_seed(0)
    param, grad = torch.randn(5, 3), torch.randn(5, 3)
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    torch.optim.AdamW([p], lr=0.01, eps=1e-3, weight_decay=0.1).step()
    assert torch.allclose(adamw_fresh_step(param, grad, 0.01, 0.1, 1e-3), p.detach(), atol=1e-7)


def test_summarise_views_keeps_confident_views():
    features = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    logits = 10 * features  # text = identity
    s = summarise_views(features, logits, 0.5)  # k = 2: views 1 and 2 (entropy of [0, 10] and [10, 0])
    assert s.selected.tolist() == [1, 2]
    assert s.feature.tolist() == [0.5, 0.5] and s.logits.tolist() == [5.0, 5.0]
    assert s.entropy == pytest.approx(math.log(2), abs=1e-6)  # the mean probability is [0.5, 0.5]
    one = summarise_views(features[:1], logits[:1], 0.1)
    assert one.pred == 1 and one.entropy == pytest.approx(entropy2(6, 8), abs=1e-6)


def test_dpe_cache_prediction_and_textual_evolution_by_hand():
    """One view, lr 0 (the residuals stay 0): logits = 20 f·t + α exp(−β(1 − f·v)); confident, so evolve."""
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    state = DPEState(text, shots=3)
    cfg = DPEConfig(alpha=1.0, beta=1.0, lr_text=0.0, lr_image=0.0)
    logits = dpe_adapt_one(state, torch.tensor([[0.6, 0.8]]), cfg, logit_scale=20.0)
    assert logits.tolist() == pytest.approx([12.0, 17.0], abs=1e-5)
    assert state.cache.valid.tolist() == [[False] * 3, [True, False, False]]
    assert float(state.cache.scores[1, 0]) == pytest.approx(entropy2(12, 16), abs=1e-6)  # / log2(2) = 1
    assert entropy2(12, 17) < 0.1
    assert state.updates == 1 and state.text.flatten().tolist() == pytest.approx([1.5, 0.0, 0.0, 1.0])
    # an unsure image (entropy 0.20 > 0.1 after the cache) does not evolve the prototypes
    state2 = DPEState(text, shots=3)
    dpe_adapt_one(state2, torch.tensor([[0.6, 0.8]]), cfg, logit_scale=10.0)
    assert entropy2(6, 9) > 0.1 and state2.updates == 0 and torch.equal(state2.text, text)


def _reference_style_dpe_step(text, feature, cached, cfg, scale):
    """The reference's step restated: [E, C] weights, nn.Parameters and a new torch AdamW (two lr groups)."""
    w = F.normalize(text, dim=-1).t()
    r_text = torch.nn.Parameter(torch.zeros_like(w))
    keys = torch.stack([torch.stack(v).mean(0) for _, v in cached]).t()  # [E, K]
    r_img = torch.nn.Parameter(torch.zeros_like(keys))
    classes = [c for c, _ in cached]
    values = F.one_hot(torch.tensor(classes), w.shape[1]).float()
    new_w, new_k = F.normalize(w + r_text, dim=0), F.normalize(keys + r_img, dim=0)
    final = scale * feature[None] @ new_w + cfg.alpha * torch.exp(-cfg.beta * (1 - feature[None] @ new_k)) @ values
    loss = -(final.softmax(-1) * final.log_softmax(-1)).sum()
    sim = F.normalize(new_k.t(), dim=-1) @ F.normalize(new_w[:, classes].t(), dim=-1).t()
    loss = loss + cfg.align * F.cross_entropy(sim / 0.01, torch.arange(len(classes)))
    opt = torch.optim.AdamW(
        [
            {"params": [r_text], "lr": cfg.lr_text, "eps": 1e-3, "weight_decay": 0.1},
            {"params": [r_img], "lr": cfg.lr_image, "eps": 1e-3, "weight_decay": 0.1},
        ]
    )
    loss.backward()
    opt.step()
    with torch.no_grad():
        new_w, new_k = F.normalize(w + r_text, dim=0), F.normalize(keys + r_img, dim=0)
        return scale * feature @ new_w + cfg.alpha * torch.exp(-cfg.beta * (1 - feature @ new_k)) @ values


def test_dpe_residual_step_equals_the_reference_procedure():
    torch.manual_seed(1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    feats = F.normalize(torch.randn(3, 8), dim=-1)
    cfg = DPEConfig(alpha=3.0, beta=8.0, lr_text=0.05, lr_image=0.05, align=0.5, evolve_threshold=0.0)
    state = DPEState(text, shots=3)
    cached: dict[int, list[torch.Tensor]] = {}
    for f in feats:
        logits = dpe_adapt_one(state, f[None], cfg, logit_scale=10.0)
        cached.setdefault(int((f @ text.t()).argmax()), []).append(f)
        expected = _reference_style_dpe_step(text, f, sorted(cached.items()), cfg, 10.0)
        assert torch.allclose(logits, expected, atol=1e-5)
        assert not torch.allclose(logits, _reference_style_dpe_step(text, f, sorted(cached.items()), cfg_lr0(), 10.0))


def cfg_lr0() -> DPEConfig:
    return DPEConfig(alpha=3.0, beta=8.0, lr_text=0.0, lr_image=0.0, align=0.5)


def test_boostadapter_caches_by_hand():
    """text = I, scale 10, 10 views: view 0 = (.6, .8), view 1 = (0, 1) the confident one, the rest (.8, .6)."""
    text = torch.eye(2)
    views = torch.tensor([[0.6, 0.8], [0.0, 1.0]] + [[0.8, 0.6]] * 8)
    cfg = BoostConfig(query="original", pos_alpha=1.0, pos_beta=8.0, delta=3)
    state = BoostState(2, 2, cfg)
    logits = boost_adapt_one(state, views, text, cfg, logit_scale=10.0)
    h0 = entropy2(6, 8)
    assert 0.2 < h0 < 0.5  # enters the negative cache (log2 of 2 classes is 1)
    # historical entry (.6, .8) affinity 1, bootstrapped view (0, 1) affinity .8; negative: both probs in the mask
    expected = [6 - 0.117, 8 + 1 + math.exp(-8 * 0.2) - 0.117]
    assert logits.tolist() == pytest.approx(expected, abs=1e-5)
    assert state.positive.valid.sum() == 1  # the bootstrapped view was for this image only
    assert float(state.positive.scores[1, 0]) == pytest.approx(h0, abs=1e-6)
    assert state.negative.counts.tolist() == [0, 1]
    assert state.negative.probs[1, 0].tolist() == pytest.approx([1 / (1 + math.e**2), 1 / (1 + math.e**-2)])


def test_boostadapter_confident_query_and_state_round_trip():
    text = torch.eye(2)
    views = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]] + [[0.8, 0.6]] * 7)
    cfg = BoostConfig(query="confident", selection=0.2, negative=False, pos_alpha=2.0, pos_beta=1.0, delta=0)
    state = BoostState(2, 2, cfg)
    logits = boost_adapt_one(state, views, text, cfg, logit_scale=10.0)
    # query = mean of views 1, 2 = (.5, .5), logits (5, 5), pred 0; history: class 0 <- (.5, .5);
    # bootstrap (delta 0, capacity 3): view 1 -> class 1, view 2 -> class 0; the query (not renormalised) has
    # affinity .5 with every entry
    assert logits.tolist() == pytest.approx([5 + 4 * math.exp(-0.5), 5 + 2 * math.exp(-0.5)], abs=1e-5)
    copy = BoostState(2, 2, cfg)
    copy.load_state_dict(state.state_dict())
    assert torch.equal(copy.positive.keys, state.positive.keys) and torch.equal(copy.negative.keys, state.negative.keys)


# --- the plug-ins: the online contract on a tiny model, then the CLI ----------------------------------------------

CLASSES = ["red circle", "blue square", "green star", "yellow cross", "purple ring"]


def _method(tiny_backbone, name: str, **settings):
    from promptkd.tta import build_model, get_tta_method

    model, _ = build_model(CLASSES, backbone=tiny_backbone)
    cls = get_tta_method(name)
    return cls(model, cls.config_class(n_views=10, **settings))


def _batch(method, rows: slice, n: int = 6):
    from promptkd.tta.online import OnlineBatch

    generator = torch.Generator().manual_seed(0)
    text = method.model.initial_text_features()
    # features near the class texts, so that predictions are confident enough to fill and evolve the caches
    labels = torch.arange(n * 10) % len(CLASSES)
    features = F.normalize(text[labels] + 0.6 * torch.randn(n * 10, text.shape[1], generator=generator), dim=-1)
    features = features.view(n, 10, -1)[rows]
    return OnlineBatch(features, text, method.model.logit_scale, method.model.logits(features, text))


@pytest.mark.parametrize("name", ["dpe", "boostadapter"])
def test_online_state_resumes_exactly_and_episodic_resets(tiny_backbone, name):
    settings = {"evolve_threshold": 1.0} if name == "dpe" else {}  # DPE: every image evolves the prototypes
    whole = _method(tiny_backbone, name, **settings)
    whole.mode = "online"
    online = whole.predict(_batch(whole, slice(0, 6)))
    first = _method(tiny_backbone, name, **settings)
    first.mode = "online"
    first.predict(_batch(first, slice(0, 3)))
    resumed = _method(tiny_backbone, name, **settings)
    resumed.mode = "online"
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.predict(_batch(resumed, slice(3, 6))), online[3:])
    episodic = _method(tiny_backbone, name, **settings)
    episodic.mode = "episodic"
    alone = episodic.predict(_batch(episodic, slice(0, 6)))
    assert torch.equal(episodic.predict(_batch(episodic, slice(4, 5)))[0], alone[4])  # no carried state
    assert torch.equal(alone[0], online[0]) and not torch.equal(alone[1:], online[1:])
    from promptkd.tta.base import TTAError

    other = _method(tiny_backbone, name, **settings)
    with pytest.raises(TTAError, match="does not fit"):  # a state saved for another class list
        other.load_state_dict({k: v[:1] if v.dim() else v for k, v in first.state_dict().items()})


def _small_dataset(root) -> str:
    from PIL import Image

    folder = root / "tiny3"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES[:3]):
        for j in range(2):
            rel = f"{label}/{j}.png"
            (folder / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), ((label * 90 + j * 7) % 256, 40 * label, 200 - 50 * label)).save(
                folder / "images" / rel
            )
            split["test"].append([rel, label, name])
    split["train"] = split["val"] = split["test"]
    import json

    (folder / "split_zhou_Tiny3.json").write_text(json.dumps(split))
    return str(folder)


@pytest.mark.parametrize("name", ["dpe", "boostadapter"])
def test_cli_runs_both_modes_and_refuses_bad_settings(tmp_path, capsys, name):
    import json

    from promptkd.cli.main import main

    data = _small_dataset(tmp_path)
    common = ["tta", "--method", name, "--datasets", data, "--model", "pkd-tiny", "--pretrained", "random"]
    common += ["--no-progress", "--batch-size", "4", "--preset", "world", "--out", str(tmp_path / "run")]
    for mode in ("episodic", "online"):
        assert main([*common, "--mode", mode, "--set", "method.n_views=10"]) == 0
        label = name if mode == "episodic" else f"{name}-online"
        record = json.loads((tmp_path / "run" / f"{label}-tiny3-seed0-test_time_classification.json").read_text())
        assert record["num_samples"] == 6 and 0 <= record["metrics"]["acc1"] <= 1
        assert record["config"]["method_config"]["n_views"] == 10
    capsys.readouterr()
    shots = "method.shots=0" if name == "dpe" else "method.pos_shots=0"
    assert main([*common, "--overwrite", "--set", shots]) == 2
    assert "shots" in capsys.readouterr().err
    assert main([*common, "--overwrite", "--set", "method.n_views=5"]) == 2  # 10% of 5 views keeps none
    assert "keep no view" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["dpe", "boostadapter"])
def test_plugin_logit_scale_is_the_models_or_the_references_fixed_100(tiny_backbone, name):
    """Default: the model's learned scale; ``logit_scale: 100``: 100 · cos inside, × model scale / 100 out."""
    for setting, inside in ((0.0, None), (100.0, 100.0)):
        method = _method(tiny_backbone, name, logit_scale=setting)
        batch = _batch(method, slice(0, 1))
        scale = inside or batch.logit_scale
        if name == "dpe":
            core = dpe_adapt_one(DPEState(batch.text, 3), batch.features[0], method.config, scale)
        else:
            state = BoostState(5, batch.text.shape[1], method.config)
            core = boost_adapt_one(state, batch.features[0], batch.text, method.config, scale)
        assert batch.logit_scale != 100.0
        assert torch.allclose(method.predict(batch)[0], core * batch.logit_scale / scale, atol=1e-5)


@pytest.mark.parametrize("name", ["dpe", "boostadapter"])
@pytest.mark.parametrize("preset", ["default", "world", "fine_grained"])
def test_presets_are_valid_settings(name, preset):
    from promptkd.config import from_dict
    from promptkd.tta import get_tta_method
    from promptkd.tta.run import resolve_tta_config

    config = resolve_tta_config(preset, [], {"method": name, "datasets": ["shapes"]})
    settings = from_dict(get_tta_method(name).config_class, config.method_config)
    assert settings.logit_scale == 0.0 and settings.n_views in (1, 64)
