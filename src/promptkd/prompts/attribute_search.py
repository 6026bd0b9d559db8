"""ATPrompt's differentiable attribute search (Li et al., ICCV 2025; zhengli97/ATPrompt ``attributecompute.py``).

Every combination S of 1..K candidate attributes (``itertools.combinations``: candidate order kept inside each
combination) gets its own CoOp-style prompt ``[soft x n][a_1]..[soft x n][a_|S|][ctx x M][CLASS].`` and one
weight α_S. The class logits mix the combinations' logits,

    z(x) = Σ_S softmax(α)_S · s · cos(f(x), g(t_c^S)),

and training alternates per step: the prompts take an SGD step on a training batch (CE on z), then α takes an
Adam step (lr 0.02, betas (0.5, 0.999), no weight decay) on a validation batch. The combination with the highest
weight is kept. α starts as U(0, 1) draws, the prompts as N(0, 0.02²) (class context) and N(0, 0.01²) (attribute
blocks), as the reference does.

Candidates come from a file (one per line) or a small built-in list (:data:`BUILTIN_CANDIDATES`); the reference
asks an LLM for five attributes per dataset, which is not available here.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from promptkd.errors import PromptKDError
from promptkd.prompts.encoders import PromptedTextEncoder
from promptkd.prompts.learners import TextPromptLearner, normalise_attributes

__all__ = [
    "ALPHA_BETAS",
    "ALPHA_LR",
    "BUILTIN_CANDIDATES",
    "MAX_COMBINATIONS",
    "AttributeSearch",
    "AttributeSearchError",
    "SearchStep",
    "attribute_combinations",
    "candidates_sha256",
    "read_candidates",
    "run_search",
]

#: α's optimiser in the reference (``optim_weight``): Adam, lr 0.02, betas (0.5, 0.999), weight decay 0.
ALPHA_LR = 0.02
ALPHA_BETAS = (0.5, 0.999)
#: Each step encodes every class once per combination: 64 combinations is 2x the reference's largest search
#: (all 31 subsets of 5 candidates) and already 64x a CoOp step's text cost.
MAX_COMBINATIONS = 64

#: Built-in candidates (no LLM here). ``generic``: the reference's ImageNet list (scripts/attribute_compute).
#: The world lists use words of the world CLIPs' vocabulary (words outside it tokenize byte by byte).
BUILTIN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "generic": ("color", "size", "shape", "habitat", "behavior"),
    "shapes": ("shape", "pattern", "background", "type", "drawing"),
    "patterns": ("pattern", "shape", "background", "type", "picture"),
    "counts": ("shape", "type", "picture", "background", "drawing"),
}


class AttributeSearchError(PromptKDError, ValueError):
    """Bad candidates or search settings (refused before any work)."""


def read_candidates(path: str | Path) -> tuple[str, ...]:
    """One attribute per line (UTF-8; blank lines skipped); empty files and duplicates are refused."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise AttributeSearchError(f"{path} is not UTF-8 text (byte offset {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise AttributeSearchError(f"{path}: cannot be read ({error.strerror or error})") from None
    words = [line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()]
    if not words:
        raise AttributeSearchError(f"{path} holds no attributes; write one candidate attribute per line")
    try:
        return normalise_attributes(words)
    except ValueError as error:
        raise AttributeSearchError(f"{path}: {error}") from None


def candidates_sha256(candidates: Sequence[str]) -> str:
    """SHA-256 of the candidate list as used (one per line, UTF-8), recorded with the result."""
    return hashlib.sha256("\n".join(candidates).encode("utf-8")).hexdigest()


def attribute_combinations(candidates: Sequence[str], max_attributes: int) -> list[tuple[str, ...]]:
    """Combinations of 1..``max_attributes`` candidates (size first, then candidate order); bounded in number."""
    if max_attributes < 1:
        raise AttributeSearchError(f"--max-attributes must be at least 1, got {max_attributes}")
    if max_attributes > len(candidates):
        raise AttributeSearchError(
            f"--max-attributes {max_attributes} but only {len(candidates)} candidates; give more candidates or a "
            f"smaller --max-attributes"
        )
    total = sum(math.comb(len(candidates), r) for r in range(1, max_attributes + 1))
    if total > MAX_COMBINATIONS:
        raise AttributeSearchError(
            f"{len(candidates)} candidates with up to {max_attributes} attributes make {total} combinations, more "
            f"than {MAX_COMBINATIONS} (each one is a prompt encoded for every class at every step); use fewer "
            "candidates or a smaller --max-attributes (the reference searches 5 candidates)"
        )
    return [c for r in range(1, max_attributes + 1) for c in itertools.combinations(candidates, r)]


class AttributeSearch(nn.Module):
    """One :class:`TextPromptLearner` per attribute combination and the mixing weights α."""

    def __init__(
        self,
        encoder: PromptedTextEncoder,
        tokenizer: Any,
        classnames: Sequence[str],
        combinations: Sequence[Sequence[str]],
        *,
        n_ctx: int = 4,
        attribute_ctx: int | None = None,
        init: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not combinations:
            raise AttributeSearchError("no attribute combinations to search")
        object.__setattr__(self, "_encoder", encoder)  # frozen, not ours to save
        self.combinations = [tuple(c) for c in combinations]
        self.alpha = nn.Parameter(torch.rand(len(self.combinations), generator=generator))
        learners = []
        for combination in self.combinations:
            try:
                learners.append(
                    TextPromptLearner(
                        encoder,
                        tokenizer,
                        classnames,
                        n_ctx=n_ctx,
                        init=init,
                        generator=generator,
                        attributes=combination,
                        attribute_ctx=attribute_ctx,
                    )
                )
            except ValueError as error:
                raise AttributeSearchError(f"attributes {list(combination)}: {error}") from error
        self.prompts = nn.ModuleList(learners)

    def weights(self) -> torch.Tensor:
        """softmax(α) over the combinations, float32."""
        return torch.softmax(self.alpha.float(), dim=0)

    def text_features(self) -> torch.Tensor:
        """Normalised class text features per combination: [S, C, E]."""
        return torch.stack([F.normalize(p.encode(normalize=False).float(), dim=-1) for p in self.prompts])

    def logits(self, image: torch.Tensor, scale: float | torch.Tensor, text: torch.Tensor | None = None):
        """Σ_S softmax(α)_S · s · image @ text_Sᵀ for normalised image features [B, E]: [B, C]."""
        text = self.text_features() if text is None else text
        per_combination = scale * torch.einsum("be,sce->sbc", image.float(), text)
        return torch.einsum("s,sbc->bc", self.weights(), per_combination)

    def best(self) -> tuple[str, ...]:
        return self.combinations[int(self.alpha.detach().argmax())]

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.prompts.parameters() if p.requires_grad]


@dataclass
class SearchStep:
    """One alternating step's losses (for the progress bar and the log)."""

    train_loss: float
    val_loss: float


def _step(
    model: AttributeSearch,
    features: Callable[[torch.Tensor], torch.Tensor],
    scale: float,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    prompt_optimizer: torch.optim.Optimizer,
    alpha_optimizer: torch.optim.Optimizer,
) -> SearchStep:
    """Prompts on the training batch, then α on the validation batch (the reference's ``forward_backward``)."""
    images, labels = train
    loss = F.cross_entropy(model.logits(features(images), scale), labels)
    prompt_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    prompt_optimizer.step()
    images, labels = val
    with torch.no_grad():  # α's gradient needs the prompts' features, not their gradients
        text = model.text_features()
    val_loss = F.cross_entropy(model.logits(features(images), scale, text), labels)
    alpha_optimizer.zero_grad(set_to_none=True)
    val_loss.backward()
    alpha_optimizer.step()
    return SearchStep(float(loss.detach()), float(val_loss.detach()))


def _cycle(make: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    while True:
        empty = True
        for item in make():
            empty = False
            yield item
        if empty:
            raise AttributeSearchError("the validation split is empty; the search needs validation images for α")


def run_search(
    model: AttributeSearch,
    features: Callable[[torch.Tensor], torch.Tensor],
    scale: float,
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    prompt_optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    lr_at: Callable[[int, int], float],
    alpha_lr: float = ALPHA_LR,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Alternate prompt and α steps for ``epochs`` epochs; returns per-epoch mean losses and α's weights.

    ``train_batches(epoch)`` yields (images, labels) of one epoch; ``val_batches()`` one pass over validation,
    cycled; ``lr_at(epoch, step)`` is the prompts' learning rate (the engine's schedule).
    """
    alpha_optimizer = torch.optim.Adam([model.alpha], lr=alpha_lr, betas=ALPHA_BETAS, weight_decay=0.0)
    val = _cycle(val_batches)
    history = []
    bar = tqdm(range(epochs), desc="attribute search", disable=not progress)
    for epoch in bar:
        losses = []
        for step, batch in enumerate(
            tqdm(train_batches(epoch), desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
        ):
            for group in prompt_optimizer.param_groups:
                group["lr"] = lr_at(epoch, step)
            losses.append(_step(model, features, scale, batch, next(val), prompt_optimizer, alpha_optimizer))
        mean = {
            "train_loss": sum(s.train_loss for s in losses) / max(1, len(losses)),
            "val_loss": sum(s.val_loss for s in losses) / max(1, len(losses)),
        }
        history.append({"epoch": epoch + 1, **mean, "best": " ".join(model.best())})
        bar.set_postfix(best="+".join(model.best()), val=f"{mean['val_loss']:.3f}")
    return history
