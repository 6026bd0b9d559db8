"""Zero-shot prompt templates, written out as data.

- :data:`DATASET_TEMPLATES`: the single per-dataset template of CoOp's ``ZeroshotCLIP`` (``CUSTOM_TEMPLATES`` in
  KaiyangZhou/CoOp ``trainers/zsclip.py``), keyed by this package's canonical dataset names.
- :data:`OPENAI_IMAGENET_TEMPLATES`: the 80 ImageNet prompts from OpenAI's CLIP prompt-engineering notebook, in
  their published order (the same list as ``open_clip.zero_shot_metadata``).
- :data:`PROMPTSRC_IMAGENET_TEMPLATES`: PromptSRC's 60-prompt copy of that list ("a photo of a {}." first), the
  templates of its textual-diversity targets.
- :data:`IMAGENET_TEMPLATES_SELECT`: the 7-prompt subset CoOp's ``ZeroshotCLIP2`` ensembles with the dataset template.

All templates use ``"{}"`` for the class name: ``template.format(classname)``.
"""

from __future__ import annotations

__all__ = [
    "DATASET_TEMPLATES",
    "DEFAULT_TEMPLATE",
    "IMAGENET_TEMPLATES_SELECT",
    "OPENAI_IMAGENET_TEMPLATES",
    "PROMPTSRC_IMAGENET_TEMPLATES",
    "dataset_template",
    "ensemble_templates",
]

DEFAULT_TEMPLATE = "a photo of a {}."

DATASET_TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


#: PromptSRC's own copy of the ImageNet templates (muzairkhattak/PromptSRC ``trainers/imagenet_templates.py``,
#: ``IMAGENET_TEMPLATES``): 60 of the 80 OpenAI prompts, "a photo of a {}." first, then the OpenAI order. PromptSRC
#: averages the frozen text features of these into its textual-diversity targets t̃. Written as the 20 it leaves
#: out (the list itself and its hash are pinned by tests/test_parity_pins.py).
_NOT_IN_PROMPTSRC = frozenset(
    {
        "a jpeg corrupted photo of the {}.",
        "a good photo of a {}.",
        "a plushie {}.",
        "a photo of the nice {}.",
        "a photo of the small {}.",
        "a photo of the weird {}.",
        "the cartoon {}.",
        "art of the {}.",
        "a drawing of the {}.",
        "a photo of the large {}.",
        "a black and white photo of a {}.",
        "the plushie {}.",
        "a dark photo of a {}.",
        "itap of a {}.",
        "graffiti of the {}.",
        "a toy {}.",
        "itap of my {}.",
        "a photo of a cool {}.",
        "a photo of a small {}.",
        "a tattoo of the {}.",
    }
)
PROMPTSRC_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    *(t for t in OPENAI_IMAGENET_TEMPLATES if t not in _NOT_IN_PROMPTSRC and t != "a photo of a {}."),
)


def dataset_template(name: str) -> str:
    """The single zero-shot template of a benchmark (canonical name); unknown names get ``"a photo of a {}."``."""
    return DATASET_TEMPLATES.get(name, DEFAULT_TEMPLATE)


def ensemble_templates(name: str) -> list[str]:
    """CoOp ``ZeroshotCLIP2`` ensemble: the 7 selected ImageNet templates plus the dataset template (ImageNet: 7)."""
    templates = list(IMAGENET_TEMPLATES_SELECT)
    if name != "imagenet":
        templates.append(dataset_template(name))
    return templates
