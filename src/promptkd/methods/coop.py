"""CoOp: Context Optimization (Zhou, Yang, Loy & Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022).

Follows KaiyangZhou/CoOp ``trainers/coop.py``. The prompt of class c is (§3.2, Eq. 2-4 of the paper)

    t_c = [SOS] [v]_1 ... [v]_M [CLASS_c] [.] [EOT]                  (class token at the 'end')

with unified context v shared by all classes, or class-specific context v^c (CSC). Only v is learnt, with
cross-entropy on ``s · cos(f(x), g(t_c))``; both CLIP towers stay frozen.

Defaults are the reference ``extend_cfg`` (M = 16, random N(0, 0.02²) init, unified context, class token at the end).
An init phrase ("a photo of a" in the ``*_ctxv1`` configs) sets the context to the phrase's token embeddings and
**overrides M** with its token count, as the reference does. Trainable parameters: M·W_t (unified) or C·M·W_t (CSC),
W_t = the text width (8,192 for M = 16 on ViT-B/16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from promptkd.backbones import Backbone
from promptkd.methods import MethodConfig, register_method
from promptkd.methods.prompted import (
    AttributePromptConfig,
    PromptConfigError,
    PromptedMethod,
    apply_attributes,
    make_text_learner,
)

__all__ = ["CoOp", "CoOpConfig"]

logger = logging.getLogger(__name__)


@dataclass
class CoOpConfig(MethodConfig, AttributePromptConfig):
    """CoOp hyper-parameters (reference ``TRAINER.COOP.*``)."""

    n_ctx: int = field(default=16, metadata={"help": "context length M (N_CTX); ignored with ctx_init"})
    ctx_init: str = field(
        default="", metadata={"help": "init phrase, e.g. 'a photo of a' (CTX_INIT); sets M to its token count"}
    )
    class_specific: bool = field(default=False, metadata={"help": "one context per class (CSC); random init only"})
    class_token_position: Literal["end", "middle", "front"] = field(
        default="end", metadata={"help": "where the class name goes (CLASS_TOKEN_POSITION)"}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the random context init"})

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError("n_ctx must be at least 1")
        if self.class_specific and self.ctx_init.strip():
            raise ValueError("class-specific context (CSC) is randomly initialised in CoOp; set ctx_init to ''")
        if self.init_std <= 0:
            raise ValueError("init_std must be positive")
        self.check_attributes()


@register_method
class CoOp(PromptedMethod):
    """CoOp: learnable text context for frozen CLIP (see the module docstring).

    ``learner.text.ctx`` is [M, W_t] (unified) or [C, M, W_t] (CSC). ``set_classnames`` rebuilds the class-token
    buffers for any class list; CSC context is bound to its classes and refuses another list.
    """

    name: ClassVar[str] = "coop"
    config_class: ClassVar[type[MethodConfig]] = CoOpConfig
    config: CoOpConfig

    def __init__(self, backbone: Backbone, classnames: list[str], config: CoOpConfig | None = None):
        super().__init__(backbone, classnames, config)
        cfg = self.config
        init = cfg.ctx_init.strip() or None
        if init is not None and cfg.n_ctx != CoOpConfig.n_ctx:
            logger.info("coop: ctx_init %r sets the context length; n_ctx=%d is ignored (as in CoOp)", init, cfg.n_ctx)
        self.learner.text = make_text_learner(
            self.name,
            self.text_encoder,
            backbone,
            classnames,
            n_ctx=None if init else cfg.n_ctx,
            init=init,
            class_specific=cfg.class_specific,
            position=cfg.class_token_position,
            init_std=cfg.init_std,
        )
        apply_attributes(self, cfg)
        self.learner.to(backbone.device)

    def set_classnames(self, classnames: list[str]) -> None:
        if self.config.class_specific and list(classnames) != self.classnames:
            raise PromptConfigError(
                f"coop: class-specific context (CSC) was learnt for {len(self.classnames)} classes "
                f"({', '.join(self.classnames[:4])}, ...) and cannot score other classes; "
                "evaluate on the training classes, or train with unified context (class_specific=false)."
            )
        super().set_classnames(classnames)
