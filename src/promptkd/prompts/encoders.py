"""CLIP's two towers run on prompt embeddings, by iterating open_clip's public modules (no fork, no patching).

Tensors are batch-first [N, L, D] throughout, as in open_clip 3.x. With no prompts both encoders reproduce
``encode_text`` / ``encode_image`` exactly.

Prompt layouts (the rule of VPT-deep, IVLP, MaPLe, PromptSRC and the PromptKD student):
- image: layer-0 prompts are appended after [CLS + patches] (after the positional embedding, before ``ln_pre``);
  before block i (1 <= i < depth) the last n tokens are replaced by layer i's prompts; prompts are dropped
  before pooling, so the pooled output is the CLS token as usual.
- text: the layer-0 context is part of the input embeddings (see ``TextPromptLearner``); before block i
  (1 <= i < depth) positions 1..n (right after SOS) are replaced by layer i's prompts, so the length and the
  causal mask are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from promptkd.errors import PromptKDError

PromptLayers = torch.Tensor | Sequence[torch.Tensor] | None


class UnsupportedModelError(PromptKDError, RuntimeError):
    """A model whose towers cannot take prompts (ResNet or timm image towers, HF text towers, CoCa)."""


def prompt_layers(prompts: PromptLayers) -> list[torch.Tensor]:
    """Normalise prompts to one tensor per layer, each [n, D] (shared) or [N, n, D] (one set per sample).

    Accepts [depth, n, D], [N, depth, n, D] or a sequence of per-layer tensors.
    """
    if prompts is None:
        return []
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 3:
            return list(prompts.unbind(0))
        if prompts.dim() == 4:
            return list(prompts.unbind(1))
        raise ValueError(f"prompts must be [depth, n, D] or [N, depth, n, D]; got shape {tuple(prompts.shape)}")
    return list(prompts)


def _expand(prompt: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    prompt = prompt.to(dtype)
    return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.dim() == 2 else prompt


def _check_layers(layers: list[torch.Tensor], n_blocks: int, width: int, what: str, max_layers: int) -> None:
    if len(layers) > max_layers:
        raise ValueError(f"{what}: {len(layers)} prompt layers given but the tower has {n_blocks} blocks")
    for i, layer in enumerate(layers):
        if layer.shape[-1] != width:
            raise ValueError(f"{what}: prompt layer {i} has width {layer.shape[-1]}, the tower's width is {width}")


class PromptedTextEncoder(nn.Module):
    """open_clip's text tower applied to prompt embeddings instead of token ids."""

    def __init__(self, model: nn.Module):
        super().__init__()
        tower = model.text if hasattr(model, "text") else model
        if not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
            raise UnsupportedModelError(
                f"{type(tower).__name__} text towers (e.g. Hugging Face text models) cannot take prompt embeddings; "
                "use an open_clip model with its own text transformer (CLIP or CustomTextCLIP without hf_model_name)."
            )
        if getattr(tower, "cls_emb", None) is not None:
            raise UnsupportedModelError("text towers with an appended CLS embedding (CoCa) are not supported.")
        if not getattr(tower.transformer, "batch_first", True):
            raise UnsupportedModelError("text transformer built with batch_first=False is not supported.")
        self.token_embedding = tower.token_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.positional_embedding = tower.positional_embedding
        self.text_projection = tower.text_projection
        mask = getattr(tower, "attn_mask", None)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.pool_type = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
        self.eos_id = getattr(tower, "text_eos_id", None) or getattr(tower, "eos_id", None)
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise UnsupportedModelError(f"text pool type {self.pool_type!r} is not supported.")

    @property
    def width(self) -> int:
        return int(self.ln_final.weight.shape[0])

    @property
    def n_blocks(self) -> int:
        return len(self.transformer.resblocks)

    @property
    def cast_dtype(self) -> torch.dtype:
        return self.transformer.get_cast_dtype()

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> input embeddings [N, L, W] (what prompt learners splice context into)."""
        return self.token_embedding(token_ids).to(self.cast_dtype)

    def pool_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token per sequence (EOT for CLIP's argmax pooling)."""
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(token_ids.shape[0], dtype=torch.long, device=token_ids.device)
        return torch.full((token_ids.shape[0],), token_ids.shape[1] - 1, dtype=torch.long, device=token_ids.device)

    def forward(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        deep_prompts: PromptLayers = None,
        *,
        truncate: bool = True,
        normalize: bool = False,
        deep_offset: int = 1,
    ) -> torch.Tensor:
        """Encode prompt embeddings [N, L, W] whose token ids [N, L] give the pooling position.

        Args:
            deep_prompts: prompts replacing positions 1..n before blocks 1..len(deep_prompts) (IVLP/MaPLe rule);
                [depth-1, n, W], [N, depth-1, n, W] or a per-layer sequence.
            deep_offset: first position the deep prompts replace (1: right after SOS; ATPrompt's attribute blocks
                come first, see ``TextPromptLearner.deep_offset``).
            truncate: drop positions after the last EOT (exact: the causal mask hides them from the EOT token);
                saves ~4x compute for typical prompts.
        """
        n_seq = embeddings.shape[0]
        positions = self.pool_positions(token_ids)
        causal = self.attn_mask is not None
        length = embeddings.shape[1]
        if truncate and causal and self.pool_type in ("argmax", "eos", "first"):
            length = int(positions.max()) + 1
            embeddings = embeddings[:, :length]
        cast = self.cast_dtype
        x = embeddings.to(cast) + self.positional_embedding[:length].to(cast)
        mask = self.attn_mask[:length, :length] if causal else None
        layers = prompt_layers(deep_prompts)
        _check_layers(layers, self.n_blocks, self.width, "text deep prompts", self.n_blocks - 1)
        for index, block in enumerate(self.transformer.resblocks):
            if 1 <= index <= len(layers):
                prompt = _expand(layers[index - 1], n_seq, x.dtype)
                n_tokens = prompt.shape[1]
                x = torch.cat([x[:, :deep_offset], prompt, x[:, deep_offset + n_tokens :]], dim=1)
            x = block(x, attn_mask=mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(n_seq, device=x.device), positions]
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    def encode_ids(self, token_ids: torch.Tensor, deep_prompts: PromptLayers = None, **kwargs) -> torch.Tensor:
        """Plain text (no learned context): equals ``model.encode_text`` when ``deep_prompts`` is None."""
        return self(self.embed_tokens(token_ids), token_ids, deep_prompts, **kwargs)


BlockHook = Callable[[int, torch.Tensor], None]


class PromptedImageEncoder(nn.Module):
    """open_clip's ViT image tower with deep visual prompts appended after the patch tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        visual = model.visual
        self.supports_prompts = all(
            hasattr(visual, name) for name in ("conv1", "class_embedding", "positional_embedding", "transformer")
        )
        self.visual = visual
        if self.supports_prompts and not getattr(visual.transformer, "batch_first", True):
            raise UnsupportedModelError("vision transformer built with batch_first=False is not supported.")

    @property
    def width(self) -> int:
        if not self.supports_prompts:
            raise UnsupportedModelError(self._unsupported_message())
        return int(self.visual.conv1.weight.shape[0])

    @property
    def n_blocks(self) -> int:
        return len(self.visual.transformer.resblocks) if self.supports_prompts else 0

    def _unsupported_message(self) -> str:
        return (
            f"{type(self.visual).__name__} image towers (ResNet, timm backbones) cannot take visual prompts; "
            "use an open_clip ViT (e.g. ViT-B-16), or a method without visual prompts."
        )

    def forward(
        self,
        images: torch.Tensor,
        prompts: PromptLayers = None,
        *,
        block_hook: BlockHook | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Encode images [N, 3, H, W] with per-layer prompts ([depth, n, D], [N, depth, n, D] or a sequence).

        ``block_hook(i, x)`` sees the input of block i (prompts included), e.g. for PromptAlign's token statistics.
        """
        layers = prompt_layers(prompts)
        if not self.supports_prompts:
            if layers or block_hook is not None:
                raise UnsupportedModelError(self._unsupported_message())
            features = self.visual(images)
            return nn.functional.normalize(features, dim=-1) if normalize else features
        visual = self.visual
        _check_layers(layers, self.n_blocks, self.width, "visual prompts", self.n_blocks)
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        batch = x.shape[0]
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        n_tokens = 0
        if layers:
            first = _expand(layers[0], batch, x.dtype)
            n_tokens = first.shape[1]
            x = torch.cat([x, first], dim=1)
        x = visual.ln_pre(x)
        for index, block in enumerate(visual.transformer.resblocks):
            if 1 <= index < len(layers):
                x = torch.cat([x[:, :-n_tokens], _expand(layers[index], batch, x.dtype)], dim=1)
            if block_hook is not None:
                block_hook(index, x)
            x = block(x)
        if n_tokens:
            x = x[:, :-n_tokens]
        if hasattr(visual, "_pool"):
            pooled, _ = visual._pool(x)
        else:  # pragma: no cover - older/newer open_clip without the private helper
            pooled = visual.ln_post(x[:, 0])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return nn.functional.normalize(pooled, dim=-1) if normalize else pooled
