"""Learnable prompt parameters: CoOp context (+ deep text prompts), deep visual prompts, MaPLe coupling.

These modules hold only trainable tensors; the frozen CLIP lives elsewhere. Their parameter names are the keys of
promptkd checkpoints: ``text.ctx``, ``text.deep``, ``text.attr_ctx`` (ATPrompt), ``visual.prompts``,
``coupling.{k}.weight`` (see ``promptkd.checkpoints.reference`` for how the reference code's keys map onto them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from promptkd.prompts.encoders import PromptedTextEncoder

Position = Literal["end", "middle", "front"]
POSITIONS = ("end", "middle", "front")


def clean_classname(name: str) -> str:
    """All reference trainers replace '_' with ' ' in class names."""
    return name.replace("_", " ")


def normalise_attributes(attributes: Sequence[str]) -> tuple[str, ...]:
    """ATPrompt attribute words, stripped; an empty word or a duplicate (case and spacing ignored) is refused,
    since a repeated attribute only wastes context and a blank one would splice nothing between soft blocks."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for raw in attributes:
        word = " ".join(str(raw).split())
        if not word:
            raise ValueError(f"attribute {raw!r} is empty")
        key = word.casefold()
        if key in seen:
            raise ValueError(f"attribute {word!r} is given twice (as {seen[key]!r} too; case and spacing ignored)")
        seen[key] = word
        out.append(word)
    return tuple(out)


def _normal(shape: Sequence[int], std: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(*shape).normal_(mean=0.0, std=std, generator=generator)


class TextPromptLearner(nn.Module):
    """CoOp's learnable context for C class prompts, plus optional deep text prompts (IVLP / MaPLe / PromptSRC).

    The prompt of class c is ``[SOS] [ctx_1..ctx_M] [CLASS c] [.] [EOT]`` ('end'); 'front' and 'middle' move the
    class tokens as in CoOp. With an init phrase ("a photo of a") the context starts as that phrase's token
    embeddings and M defaults to its token count; with ``n_ctx`` smaller than the phrase, only the first ``n_ctx``
    tokens are learnable and the rest stay fixed words (MaPLe's rule: n = 2 learns "a photo", keeps "of a").

    ATPrompt (Li et al., ICCV 2025): with ``attributes`` (a_1..a_A) the prompt becomes
    ``[SOS] [soft x n] [a_1] ... [soft x n] [a_A] [ctx_1..ctx_M] [CLASS c] [.] [EOT]``: each fixed attribute word
    follows its own block of n learnable tokens (``attr_ctx`` [A, n, W], N(0, 0.01²) as the reference's
    ``ctx_att*``); ``ctx`` stays the class context right before the class name, and deep text prompts replace
    that block (:attr:`deep_offset`), as the reference's ``model_atp`` blocks do.

    Class-token buffers are rebuilt from the current class list (``set_classnames``), never saved, so a context
    learnt on one dataset can be evaluated on another (except class-specific context, which is bound to its classes).
    """

    def __init__(
        self,
        encoder: PromptedTextEncoder,
        tokenizer,
        classnames: Sequence[str],
        *,
        n_ctx: int | None = None,
        init: str | None = "a photo of a",
        class_specific: bool = False,
        position: Position = "end",
        deep_depth: int = 1,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
        attributes: Sequence[str] = (),
        attribute_ctx: int | None = None,
        attribute_init_std: float = 0.01,
    ):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class-token position {position!r} is not one of {', '.join(POSITIONS)}")
        if class_specific and init:
            raise ValueError("class-specific context (CSC) is randomly initialised in CoOp; set init=None.")
        if deep_depth < 1 or deep_depth > encoder.n_blocks:
            raise ValueError(f"text prompt depth {deep_depth} must be between 1 and the {encoder.n_blocks} text blocks")
        self.tokenizer = tokenizer
        self.position: Position = position
        self.class_specific = class_specific
        width = encoder.width
        object.__setattr__(self, "_encoder", encoder)  # not a submodule: the frozen tower is not ours to save
        init = init.replace("_", " ").strip() if init else None
        if init:
            ids = tokenizer([init])
            n_init = int(encoder.pool_positions(ids)[0]) - 1
            if n_init < 1:
                raise ValueError(f"init phrase {init!r} has no tokens")
            n_ctx = n_init if n_ctx is None else n_ctx
            if n_ctx > n_init:
                raise ValueError(
                    f"init phrase {init!r} has {n_init} tokens but n_ctx={n_ctx}; use n_ctx <= {n_init}, "
                    "or init=None for random N(0, 0.02) context."
                )
            if n_ctx < n_init and position != "end":
                raise ValueError("a partially learnable init phrase needs class-token position 'end'")
            with torch.no_grad():
                embedding = encoder.embed_tokens(ids.to(encoder.positional_embedding.device)).float()
            ctx = embedding[0, 1 : 1 + n_ctx].clone().cpu()
            self.prefix_text = init
        else:
            n_ctx = 16 if n_ctx is None else n_ctx
            shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
            ctx = _normal(shape, init_std, generator)
            self.prefix_text = " ".join(["X"] * n_ctx)
        if n_ctx < 1:
            raise ValueError("n_ctx must be at least 1")
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)
        self.deep_depth = deep_depth
        if deep_depth > 1:
            self.deep = nn.Parameter(_normal((deep_depth - 1, n_ctx, width), init_std, generator))
        else:
            self.register_parameter("deep", None)
        self._n_fixed_classes = len(classnames) if class_specific else None
        self.classnames = [clean_classname(c) for c in classnames]
        self.set_attributes(attributes, attribute_ctx, init_std=attribute_init_std, generator=generator)

    def set_attributes(
        self,
        attributes: Sequence[str],
        n_ctx: int | None = None,
        *,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> None:
        """Use ATPrompt attribute words, each after ``n_ctx`` fresh soft tokens (default: as many as the class
        context, the reference scripts' N_ATT = N_CTX); an empty list restores the plain prompt. Rebuilds the
        class buffers, so a prompt that no longer fits the context length is refused here."""
        attributes = normalise_attributes(attributes)
        n_attr = self.n_ctx if n_ctx is None or n_ctx == 0 else n_ctx
        if attributes and n_attr < 1:
            raise ValueError(f"attribute_ctx must be at least 1, got {n_attr}")
        if attributes and init_std <= 0:
            raise ValueError("attribute_init_std must be positive")
        self.attributes = attributes
        self.n_attr_ctx = n_attr if attributes else 0
        if attributes:
            shape = (len(attributes), n_attr, self.ctx.shape[-1])
            self.attr_ctx = nn.Parameter(_normal(shape, init_std, generator).to(self.ctx.device))
        else:
            self.register_parameter("attr_ctx", None)
        self.set_classnames(self.classnames)

    def _attribute_text(self) -> tuple[str, list[int]]:
        """The attribute part of the prompt text ('X X color X X shape') and each attribute's token count."""
        lengths = [int(self.encoder.pool_positions(self.tokenizer([a]))[0]) - 1 for a in self.attributes]
        for word, n in zip(self.attributes, lengths):
            if n < 1:
                raise ValueError(f"attribute {word!r} has no tokens")
        blocks = [" ".join(["X"] * self.n_attr_ctx + [word]) for word in self.attributes]
        return " ".join(blocks), lengths

    @property
    def attribute_length(self) -> int:
        """Positions the attribute blocks take after SOS (0 without attributes)."""
        return sum(self.n_attr_ctx + n for n in self._attr_lens)

    @property
    def deep_offset(self) -> int:
        """First position of the class context ``ctx``: where deep text prompts go (1 without attributes)."""
        return 1 + self.attribute_length

    @property
    def encoder(self) -> PromptedTextEncoder:
        return self._encoder

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the fixed token buffers for a class list (cross-dataset and base/new evaluation)."""
        classnames = [clean_classname(c) for c in classnames]
        if not classnames:
            raise ValueError("the class list is empty")
        if self._n_fixed_classes is not None and len(classnames) != self._n_fixed_classes:
            raise ValueError(
                f"class-specific context was learnt for {self._n_fixed_classes} classes and cannot be used with "
                f"{len(classnames)} other classes (it does not transfer to new classes)."
            )
        attr_text, self._attr_lens = self._attribute_text() if self.attributes else ("", [])
        lead = f"{attr_text} {self.prefix_text}" if attr_text else self.prefix_text
        texts = [f"{lead} {name}." for name in classnames]
        device = self.ctx.device  # buffers live with the parameters; the frozen tower may sit elsewhere (GPU)
        token_ids = self.tokenizer(texts)
        name_lens = [int(self.encoder.pool_positions(self.tokenizer([name]))[0]) - 1 for name in classnames]
        eot = self.encoder.pool_positions(token_ids)
        if int(eot.max()) >= token_ids.shape[1] - 1:
            longest = classnames[int(eot.argmax())]
            hint = (
                f" with {len(self.attributes)} attributes of {self.n_attr_ctx} soft tokens each; use fewer attributes "
                "or a smaller attribute_ctx"
                if self.attributes
                else ""
            )
            raise ValueError(
                f"the prompt for class {longest!r} fills the whole context length ({token_ids.shape[1]} tokens) and "
                f"may be cut off{hint}"
            )
        self._check_attribute_tokens(token_ids[0])
        self.classnames = classnames
        with torch.no_grad():
            tower_device = self.encoder.positional_embedding.device
            embedding = self.encoder.embed_tokens(token_ids.to(tower_device)).float().to(device)
        token_ids = token_ids.to(device)
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_embedding", embedding, persistent=False)
        self.register_buffer(
            "gather_index", self._gather_index(token_ids.shape[1], name_lens).to(device), persistent=False
        )

    def _check_attribute_tokens(self, token_ids: torch.Tensor) -> None:
        """Each attribute's own tokens must sit where the layout expects them (BPE could merge across words)."""
        position = 1
        for word, n in zip(self.attributes, self._attr_lens):
            position += self.n_attr_ctx
            own = self.tokenizer([word])[0, 1 : 1 + n].to(token_ids.device)
            if not torch.equal(token_ids[position : position + n], own):
                raise ValueError(f"attribute {word!r} does not tokenize the same inside the prompt")
            position += n

    def _attribute_index(self, source_start: int) -> list[int]:
        """Positions 1..attribute_length: soft tokens from the source (after ``source_start``), words in place."""
        row: list[int] = []
        position, soft = 1, source_start
        for n in self._attr_lens:
            row += range(soft, soft + self.n_attr_ctx)
            soft += self.n_attr_ctx
            position += self.n_attr_ctx
            row += range(position, position + n)
            position += n
        return row

    def _gather_index(self, length: int, name_lens: list[int]) -> torch.Tensor:
        """Per class, where each output position comes from in cat([token embeddings (L), ctx (M), attr_ctx (A·n)])."""
        m, a = self.n_ctx, self.attribute_length
        ctx_idx = list(range(length, length + m))
        head = [0, *self._attribute_index(length + m)]
        rows = []
        for k in name_lens:
            name_idx = list(range(1 + a + m, 1 + a + m + k))
            rest = list(range(1 + a + m + k, length))
            if self.position == "end":
                row = [*head, *ctx_idx, *range(1 + a + m, length)]
            elif self.position == "front":
                row = [*head, *name_idx, *ctx_idx, *rest]
            else:
                half = m // 2
                row = [*head, *ctx_idx[:half], *name_idx, *ctx_idx[half:], *rest]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    def _with_attributes(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx [..., M, W] followed by the attribute soft tokens [..., A·n, W] (shared by every class and image: the
        reference's CoCoOp shifts only the class context by the meta-net bias)."""
        if self.attr_ctx is None:
            return ctx
        attr = self.attr_ctx.flatten(0, 1).to(ctx.dtype)
        return torch.cat([ctx, attr.expand(*ctx.shape[:-2], -1, -1)], dim=-2)

    @property
    def eot_length(self) -> int:
        """Positions up to and including the last EOT over the class list (what a causal text tower needs)."""
        return int(self.encoder.pool_positions(self.token_ids).max()) + 1

    def build(
        self,
        ctx: torch.Tensor | None = None,
        *,
        batched: bool = False,
        classes: slice | torch.Tensor | None = None,
        length: int | None = None,
    ) -> torch.Tensor:
        """Prompt embeddings [C, L, W]; with ``batched`` and ctx [B, M, W] (per-sample context): [B, C, L, W].

        ``classes`` selects rows of the class list and ``length`` keeps the first positions only (e.g.
        :attr:`eot_length`), so per-sample prompts for many classes never materialise the full context length.
        """
        ctx = self._with_attributes(self.ctx if ctx is None else ctx)
        emb = self.token_embedding
        index = self.gather_index
        if classes is not None:
            emb, index = emb[classes], index[classes]
        if length is not None and length < emb.shape[1]:
            # an output position p reads an embedding position <= p + n_ctx (attribute words read p itself); the
            # learnable indices (ctx, then attr_ctx) shift with the cut
            kept = min(emb.shape[1], length + self.n_ctx)
            index = index[:, :length]
            index = torch.where(index >= emb.shape[1], index - (emb.shape[1] - kept), index)
            emb = emb[:, :kept]
        n_cls, _, width = emb.shape
        length = index.shape[1]
        if batched:
            batch = ctx.shape[0]
            ctx_full = ctx.unsqueeze(1).expand(batch, n_cls, -1, -1).to(emb.dtype)
            source = torch.cat([emb.unsqueeze(0).expand(batch, -1, -1, -1), ctx_full], dim=2)
            return torch.gather(source, 2, index.view(1, n_cls, length, 1).expand(batch, -1, -1, width))
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
        elif classes is not None:  # class-specific context: the selected classes' rows
            ctx = ctx[classes]
        source = torch.cat([emb, ctx.to(emb.dtype)], dim=1)
        return torch.gather(source, 1, index.unsqueeze(-1).expand(-1, -1, width))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeddings [C, L, W], token ids [C, L]) for the current classes."""
        return self.build(), self.token_ids

    def encode(self, *, normalize: bool = True, deep: torch.Tensor | None = None) -> torch.Tensor:
        """Class text features [C, E] through the prompted text encoder."""
        embeddings, token_ids = self()
        deep = self.deep if deep is None else deep
        return self.encoder(embeddings, token_ids, deep, normalize=normalize, deep_offset=self.deep_offset)


class VisualPrompts(nn.Module):
    """Deep visual prompts: ``prompts[0]`` is appended at the input, ``prompts[i]`` replaces them before block i."""

    def __init__(
        self, n_tokens: int, depth: int, width: int, *, init_std: float = 0.02, generator: torch.Generator | None = None
    ):
        super().__init__()
        if n_tokens < 1 or depth < 1:
            raise ValueError("visual prompts need n_tokens >= 1 and depth >= 1")
        self.prompts = nn.Parameter(_normal((depth, n_tokens, width), init_std, generator))

    @property
    def depth(self) -> int:
        return int(self.prompts.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.prompts.shape[1])

    def forward(self) -> torch.Tensor:
        return self.prompts


class MultimodalCoupling(nn.Module):
    """MaPLe: vision prompts are linear functions of the text prompts, one Linear(text_width, vision_width) per layer.

    Layer 0 maps the shallow context (MaPLe's ``proj``), layers 1..J-1 the deep text prompts
    (``compound_prompt_projections``); there are no independent vision parameters.
    """

    def __init__(self, depth: int, text_width: int, vision_width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(depth))

    def forward(self, ctx: torch.Tensor, deep: torch.Tensor | None) -> list[torch.Tensor]:
        """ctx [n, Wt] (or [B, n, Wt]) and deep [J-1, n, Wt] -> J vision prompt layers, each [n, Wv]."""
        text_layers = [ctx] + (list(deep.unbind(-3)) if deep is not None else [])
        if len(text_layers) != len(self.layers):
            raise ValueError(f"coupling has {len(self.layers)} layers but got {len(text_layers)} text prompt layers")
        return [layer(prompt) for layer, prompt in zip(self.layers, text_layers)]
