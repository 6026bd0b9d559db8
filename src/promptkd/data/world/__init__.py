"""The embedded world: a seeded, procedurally rendered image world that mirrors the benchmarks' structure.

It lets the whole pipeline (pre-training tiny CLIPs, zero-shot, prompt learning, distillation, test-time tuning)
run in minutes on a CPU, with no download, through the same code path as the real benchmarks. Its design:

- **Compositional class names.** Classes are attribute combinations ("red star", "striped circle", "three rings")
  over a vocabulary of a few dozen words (:data:`WORLD_VOCABULARY`), so a small CLIP can recognise combinations
  it has never seen from the text alone, and a tiny word-level tokenizer suffices.
- **Base/new halves share words.** Labels follow a checkerboard over each attribute x shape grid, so the base half
  (first ``ceil(n/2)`` labels, the benchmarks' rule) and the new half both contain every word: novel classes are
  new *combinations*, not new words.
- **Held-out compositions.** About a fifth to a quarter of every family's compositions (a Latin-square-like pattern,
  spread over both halves) never occur in pre-training, neither as a class nor as a nuisance combination (a
  pre-training "striped star" is never green if "green star" is held out), so zero-shot accuracy leaves clear room
  for prompt learning while every word stays known.
- **Domain gap.** Pre-training images are clean (centred, large, plain dark background); downstream images have
  gradient/blotchy backgrounds, smaller objects anywhere, random pattern angles, outlines, blur and noise; the
  test-only shifts of ``shapes`` go further, as ImageNet's do: ``shapes_v2`` (a new draw, a small drop),
  ``shapes_sketch`` (drawings), ``shapes_r`` (renditions), ``shapes_a`` (clutter, occlusion), tuned so that the
  shipped teacher keeps 0.6-1.1 of its clean accuracy as CLIP does; ``shapes_noise`` is a much harsher stress set.

Datasets: ``shapes`` (colour x shape, 64 classes), ``patterns`` (pattern x shape, 32), ``counts`` (number x shape,
24), and the test-only shifts above (shapes' 64 classes). :func:`build_world` writes them with
``split_zhou_<Name>.json`` files, plus a captioned pre-training corpus and a COCO-style retrieval set.
"""

from promptkd.data.world.build import (
    MANIFEST_NAME,
    PRETRAIN_VERSION,
    WORLD_VERSION,
    WorldConfig,
    WorldMismatchError,
    build_world,
    default_world_root,
    ensure_world,
    load_manifest,
    render_unlabeled,
)
from promptkd.data.world.render import STYLES, render, render_attributes
from promptkd.data.world.spec import (
    COLOURS,
    COUNT_WORDS,
    FAMILIES,
    PATTERNS,
    PLURALS,
    PRETRAIN_TEMPLATES,
    SHAPES,
    SIZES,
    WORLD_DATASETS,
    WORLD_SYMBOLS,
    WORLD_VOCABULARY,
    Attributes,
    Family,
    WorldDataset,
    caption_choices,
    caption_words,
    depicts_held_out,
    family_of,
    get_dataset,
    held_out_compositions,
    list_datasets,
    parse_caption,
    parse_classname,
    pretrain_attributes,
    pretrain_classnames,
    sample_captions,
    shift_datasets,
)

__all__ = [
    "COLOURS",
    "COUNT_WORDS",
    "FAMILIES",
    "MANIFEST_NAME",
    "PATTERNS",
    "PLURALS",
    "PRETRAIN_TEMPLATES",
    "PRETRAIN_VERSION",
    "SHAPES",
    "SIZES",
    "STYLES",
    "WORLD_DATASETS",
    "WORLD_SYMBOLS",
    "WORLD_VERSION",
    "WORLD_VOCABULARY",
    "Attributes",
    "Family",
    "WorldConfig",
    "WorldDataset",
    "WorldMismatchError",
    "build_world",
    "caption_choices",
    "caption_words",
    "default_world_root",
    "depicts_held_out",
    "ensure_world",
    "family_of",
    "get_dataset",
    "held_out_compositions",
    "list_datasets",
    "load_manifest",
    "parse_caption",
    "parse_classname",
    "pretrain_attributes",
    "pretrain_classnames",
    "render",
    "render_attributes",
    "render_unlabeled",
    "sample_captions",
    "shift_datasets",
]
