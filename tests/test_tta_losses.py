"""Each test-time method's loss on fixed tensors, against values worked out from the papers' formulas by hand.

The model and the adaptation context are stand-ins that return fixed features, so every number below comes from the
method's ``loss`` alone; the expected values are written with ``math`` from the formulas, never with promptkd's
loss helpers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from promptkd.tta import get_tta_method

# class text features (unit norm): the identity, so logits are the image features scaled
TEXT = [[1.0, 0.0], [0.0, 1.0]]


class FixedModel:
    """Text features are the tuned ``ctx`` itself ([B, C, E]); logits are scale · cos."""

    has_coupling = True
    device = torch.device("cpu")
    image_encoder = SimpleNamespace(n_blocks=3)

    def __init__(self, scale: float = 1.0):
        self.logit_scale = scale
        self.classnames = ["a", "b"]
        self.base = {"ctx": torch.tensor(TEXT)}

    def text_features(self, params, grad=None):
        return params["ctx"]

    def logits(self, image, text):
        return self.logit_scale * torch.bmm(image, text.transpose(1, 2))


class FixedContext:
    """The confident views' features [B, k, E] (unnormalised ``raw``) and, per visual layer, their tokens."""

    def __init__(self, raw, tokens=None):
        self.raw = torch.tensor(raw)
        self.batch, self.k = self.raw.shape[:2]
        self.tokens = tokens or {}

    def selected_features(self, params, *, block_hook=None, normalize=True):
        for layer, x in self.tokens.items():
            if block_hook is not None:
                block_hook(layer, torch.tensor(x))
        return F.normalize(self.raw, dim=-1) if normalize else self.raw


def params(text=TEXT, batch=1):
    return {"ctx": torch.tensor([text] * batch, requires_grad=True)}


def value(tensor) -> float:
    return float(tensor.detach())


def entropy_of_mean(logit_rows):
    """H(mean_v softmax(z_v)) written out."""
    probs = []
    for z in logit_rows:
        exps = [math.exp(v) for v in z]
        probs.append([e / sum(exps) for e in exps])
    mean = [sum(p[c] for p in probs) / len(probs) for c in range(len(probs[0]))]
    return -sum(p * math.log(p) for p in mean)


# views of two samples (each row a confident view's feature; unit norm)
VIEWS = [[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]]]


def test_tpt_loss_is_the_marginal_entropy_of_the_confident_views():
    method = get_tta_method("tpt")(FixedModel(scale=2.0))
    loss, parts = method.loss(params(batch=2), FixedContext(VIEWS))
    expected = [entropy_of_mean([[2.0, 0.0], [1.2, 1.6]]), entropy_of_mean([[0.0, 2.0], [1.6, 1.2]])]
    assert loss.detach().tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(0.6528, abs=1e-4)  # softmax rows (0.8808, 0.1192), (0.4013, 0.5987)
    assert parts["entropy"].detach().tolist() == pytest.approx(expected, rel=1e-6)


def test_ctpt_loss_subtracts_lambda_times_the_text_dispersion():
    cls = get_tta_method("ctpt")
    method = cls(FixedModel(scale=2.0), cls.config_class(dispersion_weight=20.0))
    loss, parts = method.loss(params(batch=2), FixedContext(VIEWS))
    atfd = math.sqrt(0.5)  # centroid (0.5, 0.5): each class feature is √0.5 from it
    expected = entropy_of_mean([[2.0, 0.0], [1.2, 1.6]]) - 20.0 * atfd
    assert value(loss[0]) == pytest.approx(expected, rel=1e-6)
    assert value(parts["atfd"][0]) == pytest.approx(atfd, rel=1e-6)


class FixedStats:
    """Source means and variances per visual layer, token count 1, width 2."""

    def __init__(self, layers):
        self.layers = layers

    def check(self, model, layers, source="statistics file"):
        missing = [layer for layer in layers if layer not in self.layers]
        assert not missing, missing

    def layer(self, index):
        mean, var = self.layers[index]
        return torch.tensor([mean]), torch.tensor([var])


def test_promptalign_loss_is_entropy_plus_beta_times_mean_layer_alignment():
    # layer 0: views [1, 2], [3, 6] -> μ (2, 4), σ² (1, 4); source μ (0, 0), σ² (1, 1): |Δμ| 3, |Δσ²| 1.5
    # layer 1: views [0, 0] twice -> μ 0, σ² 0; source μ (1, 1), σ² (0, 2): |Δμ| 1, |Δσ²| 1
    # layer 2: views [2, 0] twice -> μ (2, 0), σ² 0 against zeros: |Δμ| 1; not aligned by default (the reference's
    # loop reaches layers 0 and 1 only), aligned with align_layers (0, 1, 2)
    tokens = {0: [[[1.0, 2.0]], [[3.0, 6.0]]], 1: [[[0.0, 0.0]], [[0.0, 0.0]]], 2: [[[2.0, 0.0]], [[2.0, 0.0]]]}
    stats = FixedStats({0: ([0.0, 0.0], [1.0, 1.0]), 1: ([1.0, 1.0], [0.0, 2.0]), 2: ([0.0, 0.0], [0.0, 0.0])})
    method = get_tta_method("promptalign")(FixedModel(), None, {"stats": stats})
    assert method.config.align_layers == (0, 1)
    loss, parts = method.loss(params(), FixedContext(VIEWS[:1], tokens))
    align = ((3.0 + 1.5) + (1.0 + 1.0)) / 2
    assert value(parts["align"][0]) == pytest.approx(align, rel=1e-6)
    # the reference: DISTR_LOSS_W / (ALIGN_LAYER_TO - FROM) · Σ_l (0.5 · L1(μ) + 0.5 · L1(σ²)) with 100 / 3
    reference = 100.0 / 3 * (0.5 * (3.0 + 1.5) + 0.5 * (1.0 + 1.0))
    expected = entropy_of_mean([[1.0, 0.0], [0.6, 0.8]]) + reference
    assert value(loss[0]) == pytest.approx(expected, rel=1e-6)
    cls = get_tta_method("promptalign")
    three = cls(FixedModel(), cls.config_class(align_layers=(0, 1, 2)), {"stats": stats})
    _, parts = three.loss(params(), FixedContext(VIEWS[:1], tokens))
    assert value(parts["align"][0]) == pytest.approx((4.5 + 2.0 + 1.0) / 3, rel=1e-6)


class FixedPrototypes:
    """Visual prototypes (unnormalised), one stored view per class, text prototypes."""

    def __init__(self):
        self.visual = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        self.views = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])
        self.text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])

    def check(self, model, source="prototype file"):
        pass

    def rows(self, classnames, source="prototype file"):
        return self


def discrimination_by_hand(tau, bounded):
    """L_D with text t = identity and one view per class v_0 = (1, 0), v_1 = (0.6, 0.8); s = exp(cos / τ)."""

    def s(cos):
        return math.exp(cos / tau)

    pos = [s(1.0), s(0.8)]  # t_0·v_0, t_1·v_1
    # prototype vs other prototype, own view vs other prototype, prototype vs other class's view
    neg = [s(0.0) + s(0.0) + s(0.6), s(0.0) + s(0.6) + s(0.0)]
    terms = [-math.log(p / ((p + n) if bounded else n)) for p, n in zip(pos, neg)]
    return sum(terms) / 2


def test_promptsync_loss_is_discrimination_plus_entropy_plus_alignment():
    cls = get_tta_method("promptsync")
    method = cls(FixedModel(), cls.config_class(discrimination_temperature=0.5), {"prototypes": FixedPrototypes()})
    raw = [[[2.0, 0.0], [0.0, 1.0]]]  # confident views: unit directions (1, 0), (0, 1) -> p̄ = (0.5, 0.5)
    loss, parts = method.loss(params(), FixedContext(raw))

    discrimination = discrimination_by_hand(0.5, bounded=True)
    assert value(parts["discrimination"][0]) == pytest.approx(discrimination, rel=1e-6)
    entropy = math.log(2.0)
    assert value(parts["entropy"][0]) == pytest.approx(entropy, rel=1e-6)
    # visual: test prototype x = mean raw = (1, 0.5), ‖x‖ = √1.25; p_0 = (2, 0), p_1 = (0, 1)
    norm = math.sqrt(1.25)
    visual = 0.5 * (math.log(1 + abs(norm - 2.0) / 2.0) - math.log((1 + 1.0 / norm) / 2))
    visual += 0.5 * (math.log(1 + abs(norm - 1.0) / 1.0) - math.log((1 + 0.5 / norm) / 2))
    # text: t_0 = its prototype (0); t_1 = (0, 1) vs (0.6, 0.8): unit norms, cos 0.8
    text = 0.5 * -math.log((1 + 0.8) / 2)
    assert value(parts["align"][0]) == pytest.approx(visual + text, rel=1e-6)
    assert value(loss[0]) == pytest.approx(discrimination + entropy + visual + text, rel=1e-6)


def test_promptsync_discrimination_is_bounded_below_unless_ratio_is_asked():
    cls = get_tta_method("promptsync")
    sources = {"prototypes": FixedPrototypes()}
    bounded = cls(FixedModel(), cls.config_class(discrimination_temperature=0.5), sources)
    ratio = cls(FixedModel(), cls.config_class(discrimination_temperature=0.5, discrimination="ratio"), sources)
    assert value(ratio.meta_train_loss(params())[0]) == pytest.approx(discrimination_by_hand(0.5, False), rel=1e-6)
    # at τ = 0.5 the positives outweigh the negatives: the ratio form goes below zero, the contrastive one cannot
    assert discrimination_by_hand(0.5, False) < 0 < discrimination_by_hand(0.5, True)
    assert value(bounded.meta_train_loss(params())[0]) > 0


# --- PromptSync chooses its confident views again with the updated prompts ------------------------------------


class ViewsContext:
    """All V views of one sample ([1, V, E], unit norm) and the current selection; features of the selected ones."""

    dynamic_visual = False

    def __init__(self, views, selected):
        self.view_features = torch.tensor([views])
        self.batch, self.n_views = self.view_features.shape[:2]
        self.selected = torch.tensor([selected])
        self.k = self.selected.shape[1]
        self.selected_views = None

    def selected_features(self, params, *, block_hook=None, normalize=True):
        return self.view_features[torch.arange(self.batch).unsqueeze(1), self.selected]


def test_promptsync_selects_views_with_the_prompts_it_is_given():
    # with the identity text, views 0 and 2 are the most confident (logit gap 10; view 0 by the lower index); with
    # the class features (0.6, 0.8) / (-0.6, -0.8), view 1 (0.6, 0.8) is: logits (10, -10), against view 0's
    # (6, -6) and view 2's (8, -8)
    cls = get_tta_method("promptsync")
    method = cls(FixedModel(scale=10.0), cls.config_class(selection=0.34), {"prototypes": FixedPrototypes()})
    ctx = ViewsContext([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], selected=[0])
    method.select_views(params(), ctx)
    assert ctx.selected.tolist() == [[0]]
    method.select_views(params([[0.6, 0.8], [-0.6, -0.8]]), ctx)
    assert ctx.selected.tolist() == [[1]]


@pytest.mark.parametrize("selection", ["updated", "initial"])
def test_promptsync_reselects_views_at_every_step_with_the_inner_prompts(selection, monkeypatch):
    cls = get_tta_method("promptsync")
    config = cls.config_class(selection=0.34, steps=2, view_selection=selection, discrimination_temperature=0.5)
    method = cls(FixedModel(scale=10.0), config, {"prototypes": FixedPrototypes()})
    seen = []
    original = method.select_views

    def spy(prompts, ctx):
        seen.append(prompts["ctx"].detach().clone())
        original(prompts, ctx)

    monkeypatch.setattr(method, "select_views", spy)
    ctx = ViewsContext([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], selected=[0])
    method.run_steps(params(), ctx)
    if selection == "initial":
        assert seen == [] and ctx.selected.tolist() == [[0]]
        return
    assert len(seen) == 2  # once per iteration, with θ' (after the meta-train step), never the base prompts
    start = torch.tensor([TEXT])
    assert all(float((prompts - start).abs().max()) > 1e-3 for prompts in seen)
    assert float((seen[1] - seen[0]).abs().max()) > 1e-3
