"""Test-time losses, each per sample (a [B] tensor) so that a batch of test images adapts as independent episodes.

Shapes: logits [B, V, C] (V views of each of B samples), text features [B, C, E] (normalised), token statistics
[B, T, D]. The sum over samples is what the batched optimiser back-propagates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "amplitude_angle_alignment",
    "confident_views",
    "marginal_entropy",
    "prototype_discrimination",
    "text_feature_dispersion",
    "token_statistics",
    "token_statistics_alignment",
    "view_entropy",
]


def view_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def confident_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices [B, k] of the k = int(V · fraction) lowest-entropy views of each sample (TPT; at least 1).

    Ties keep the lower view index (stable sort), so the choice does not depend on the batch.
    """
    n_views = logits.shape[1]
    k = max(1, int(n_views * fraction))
    order = torch.sort(view_entropy(logits), dim=1, stable=True).indices
    return order[:, :k]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TPT's loss H(p̄), p̄ = mean_v softmax(z_v): [B, V, C] -> [B] (log-mean-exp of log-probabilities)."""
    log_p = logits.float().log_softmax(-1)
    avg = torch.logsumexp(log_p, dim=1) - math.log(log_p.shape[1])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg.exp() * avg).sum(-1)


def text_feature_dispersion(text_features: torch.Tensor) -> torch.Tensor:
    """C-TPT's ATFD: mean over classes of ‖t_c − t̄‖₂ for normalised class features: [B, C, E] -> [B]."""
    centroid = text_features.mean(dim=-2, keepdim=True)
    return (text_features - centroid).norm(dim=-1).mean(-1)


def token_statistics(tokens: torch.Tensor, views_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and biased variance over views, per token position and channel: [B·V, T, D] -> 2 × [B, T, D]."""
    x = tokens.float().unflatten(0, (-1, views_per_sample))
    return x.mean(1), x.var(1, unbiased=False)


def token_statistics_alignment(
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    source_means: list[torch.Tensor],
    source_variances: list[torch.Tensor],
) -> torch.Tensor:
    """PromptAlign's L_align per sample: (1/L) Σ_l (mean|μ_l − μ̂_l| + mean|σ²_l − σ̂²_l|) -> [B].

    The paper writes L1 norms; the reference averages them (``mean``) and weights each half by 0.5. We average over
    elements and layers and put the scale in the weight β (the reference's effective β is 100/3 · 2 · 0.5 = 33.3).
    """
    total = 0.0
    for mu, var, mu_s, var_s in zip(means, variances, source_means, source_variances):
        total = total + (mu - mu_s).abs().flatten(1).mean(1) + (var - var_s).abs().flatten(1).mean(1)
    return total / max(1, len(means))


def prototype_discrimination(
    text_features: torch.Tensor, view_prototypes: torch.Tensor, temperature: float, *, bounded: bool = False
) -> torch.Tensor:
    """PromptSync's L_D per sample: mean_k −log(pos_k / neg_k), or with ``bounded`` (the contrastive form PromptSync
    uses by default) mean_k −log(pos_k / (pos_k + neg_k)): ≥ 0, tending to 0 as the negatives vanish.

    text_features [B, C, E]: the class prototypes under the sample's current prompts; view_prototypes [C, A, E]:
    stored features of each class's augmented proxy views (normalised). With s(a, b) = exp(cos(a, b) / τ):
    pos_k = Σ_a s(t_k, v_ka); neg_k = Σ_{m≠k} s(t_k, t_m) + Σ_{m≠k} Σ_a s(v_ka, t_m) + Σ_{m≠k} Σ_a s(t_k, v_ma),
    i.e. prototype vs other prototypes, own views vs other prototypes, prototype vs other classes' views.
    """
    n_cls = text_features.shape[1]
    t = F.normalize(text_features.float(), dim=-1)
    v = F.normalize(view_prototypes.float(), dim=-1).to(t.device)
    tv = torch.einsum("bke,mae->bkma", t, v) / temperature  # [B, C, C, A]: prototype k vs views of class m
    tt = torch.einsum("bke,bme->bkm", t, t) / temperature  # [B, C, C]
    eye = torch.eye(n_cls, dtype=torch.bool, device=t.device)
    log_pos = torch.logsumexp(tv[:, eye], dim=-1)  # [B, C]: own views
    neg_tt = tt.masked_fill(eye, float("-inf"))
    neg_tv = tv.masked_fill(eye[None, :, :, None], float("-inf")).flatten(2)
    # views of class k against other prototypes m: tv[b, m, k, a] for m != k
    neg_vt = tv.transpose(1, 2).masked_fill(eye[None, :, :, None], float("-inf")).flatten(2)
    log_neg = torch.logsumexp(torch.cat([neg_tt, neg_vt, neg_tv], dim=-1), dim=-1)
    log_denominator = torch.logaddexp(log_pos, log_neg) if bounded else log_neg
    return (log_denominator - log_pos).mean(-1)


def amplitude_angle_alignment(
    features: torch.Tensor, prototypes: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """PromptSync's class-aware alignment per sample, in log form, weighted by class probabilities.

    features [B, E] (a test sample's prototype) or [B, C, E] (one per class), prototypes [C, E], weights [B, C]:
    Σ_c w_bc · (log(1 + |‖x‖ − ‖p_c‖| / ‖p_c‖) − log((1 + cos(x, p_c)) / 2)); zero when x = p_c.
    """
    x = features.float()
    p = prototypes.float().to(x.device)
    if x.dim() == 2:
        x = x.unsqueeze(1).expand(-1, p.shape[0], -1)
    p_norm = p.norm(dim=-1).clamp_min(eps)
    amplitude = torch.log1p((x.norm(dim=-1) - p_norm).abs() / p_norm)
    cosine = F.cosine_similarity(x, p.unsqueeze(0), dim=-1, eps=eps)
    angle = -torch.log(((1 + cosine) / 2).clamp_min(eps))
    return (weights.float() * (amplitude + angle)).sum(-1)
