"""The world's words, attributes, datasets, held-out compositions and caption templates (pure data, no images)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import cache, cached_property

import numpy as np

# ----------------------------------------------------------------------------------------------------------------------
# Attribute words
# ----------------------------------------------------------------------------------------------------------------------

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
# A square is always drawn axis-aligned and a diamond at 45 degrees (both with only a few degrees of jitter), so the
# two never look alike.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")
PLURALS: dict[str, str] = {shape: (shape + "es" if shape.endswith("s") else shape + "s") for shape in SHAPES}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
SIZES: tuple[str, ...] = ("small", "large")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 195),
    "orange": (245, 135, 25),
    "cyan": (40, 210, 220),
    "pink": (250, 130, 195),
}

_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
_COUNT_VALUES = {word: n for n, word in COUNT_WORDS.items()}


@dataclass(frozen=True)
class Attributes:
    """What an image shows. ``None`` fields are nuisance attributes that a renderer samples.

    ``count`` is the number of (identical) objects; ``size`` is only meaningful for single objects.
    """

    shape: str
    colour: str | None = None
    pattern: str | None = None
    count: int | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.pattern is not None and self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")
        if self.count is not None and self.count != 1 and self.count not in COUNT_WORDS:
            raise ValueError(f"unsupported count {self.count!r}; expected 1 or one of {sorted(COUNT_WORDS)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")

    def complete(self, rng: np.random.Generator) -> Attributes:
        """Fill the missing attributes: a random colour and size, a plain pattern and a single object."""
        colour = self.colour if self.colour is not None else COLOURS[int(rng.integers(len(COLOURS)))]
        size = self.size if self.size is not None else SIZES[int(rng.integers(len(SIZES)))]
        return replace(
            self,
            colour=colour,
            pattern=self.pattern or "plain",
            count=self.count or 1,
            size=size,
        )

    def phrase(self) -> str:
        """Noun phrase naming every known attribute, e.g. "two red striped stars" or "small blue circle"."""
        n = self.count or 1
        words = [COUNT_WORDS[n]] if n > 1 else []
        if self.size is not None and n == 1:
            words.append(self.size)
        words += [w for w in (self.colour, self.pattern) if w is not None]
        words.append(PLURALS[self.shape] if n > 1 else self.shape)
        return " ".join(words)


def parse_classname(text: str) -> Attributes:
    """Parse a phrase of world words ("red star", "striped circle", "three rings", "small blue plain star").

    Word order is free; exactly one shape word (singular, or plural after a count word) is required.
    """
    fields: dict[str, object] = {}

    def put(key: str, value: object, word: str) -> None:
        if key in fields:
            raise ValueError(f"{text!r}: more than one {key} word ({word!r})")
        fields[key] = value

    for word in text.replace("_", " ").lower().split():
        if word in SHAPES:
            put("shape", word, word)
        elif word in _SINGULAR:
            put("shape", _SINGULAR[word], word)
            fields["_plural"] = True
        elif word in COLOURS:
            put("colour", word, word)
        elif word in PATTERNS:
            put("pattern", word, word)
        elif word in _COUNT_VALUES:
            put("count", _COUNT_VALUES[word], word)
        elif word in SIZES:
            put("size", word, word)
        else:
            raise ValueError(f"{text!r}: {word!r} is not an attribute word of the world")
    if "shape" not in fields:
        raise ValueError(f"{text!r}: no shape word")
    plural = bool(fields.pop("_plural", False))
    if plural != ("count" in fields):
        raise ValueError(f"{text!r}: a plural shape needs a count word and a count needs a plural shape")
    return Attributes(**fields)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------------
# Compositional families: class order (base/new interleaving) and held-out compositions
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A grid of compositions ``attribute x shape`` with its class order and its held-out cells.

    Class order puts the "even" cells of the checkerboard ``(i + j) % 2 == 0`` first, so the base half (first
    ``ceil(n/2)`` labels) and the new half each contain every word: novel classes are new *combinations* of
    words seen in base classes. Held-out cells ``j = (step * i + offset) % len(SHAPES)`` for ``i`` in
    ``holdout_rows`` form a Latin-square-like set: every word keeps most of its compositions in pre-training, and
    the held-out cells fall in both halves. ("plain" is never held out: every single-colour image is plain.)
    """

    name: str
    attribute: str  # "colour", "pattern" or "count"
    values: tuple[str, ...]
    holdout_step: int
    holdout_offsets: tuple[int, ...]
    holdout_rows: tuple[int, ...] | None = None  # None: every value

    def cell_name(self, i: int, j: int) -> str:
        shape = SHAPES[j]
        if self.attribute == "count":
            return f"{self.values[i]} {PLURALS[shape]}"
        return f"{self.values[i]} {shape}"

    @cached_property
    def cells(self) -> tuple[tuple[int, int], ...]:
        grid = [(i, j) for i in range(len(self.values)) for j in range(len(SHAPES))]
        return tuple(c for c in grid if sum(c) % 2 == 0) + tuple(c for c in grid if sum(c) % 2 == 1)

    @cached_property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.cell_name(i, j) for i, j in self.cells)

    @cached_property
    def held_out_cells(self) -> frozenset[tuple[str, str]]:
        """Held-out (attribute word, shape) pairs."""
        rows = range(len(self.values)) if self.holdout_rows is None else self.holdout_rows
        n = len(SHAPES)
        return frozenset(
            (self.values[i], SHAPES[(self.holdout_step * i + o) % n]) for i in rows for o in self.holdout_offsets
        )

    @cached_property
    def held_out(self) -> tuple[str, ...]:
        """Compositions never shown in pre-training (in class order)."""
        return tuple(self.cell_name(i, j) for i, j in self.cells if (self.values[i], SHAPES[j]) in self.held_out_cells)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("shapes", "colour", COLOURS, holdout_step=1, holdout_offsets=(2, 5)),  # 16 of 64 held out
        Family("patterns", "pattern", PATTERNS, holdout_step=3, holdout_offsets=(0, 1), holdout_rows=(1, 2, 3)),  # 6/32
        Family("counts", "count", tuple(COUNT_WORDS.values()), holdout_step=3, holdout_offsets=(0, 1)),  # 6 of 24
    )
}


def depicts_held_out(attrs: Attributes) -> bool:
    """Whether an image with these attributes shows a held-out composition of any family (colour x shape, pattern x
    shape or count x shape); pre-training images never do."""
    count = COUNT_WORDS.get(attrs.count or 1)
    return any(
        (value, attrs.shape) in FAMILIES[name].held_out_cells
        for name, value in (("shapes", attrs.colour), ("patterns", attrs.pattern), ("counts", count))
        if value is not None
    )


# ----------------------------------------------------------------------------------------------------------------------
# Downstream datasets
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldDataset:
    """Metadata of one downstream dataset of the world (the analogue of a benchmark such as DTD or ImageNet-Sketch).

    Attributes:
        name: folder name under the world root (``root/<name>/images``).
        split_name: ``<Name>`` of ``split_zhou_<Name>.json``.
        family: the compositional family the classes come from.
        style: rendering style (see ``render.STYLES``).
        templates: zero-shot prompt templates; ``templates[0]`` is the dataset's single template.
        source: for domain-shifted test-only sets, the dataset whose classes they share.
        stress: a test-only set far harsher than the real shifts (kept for robustness checks, not a default target).
    """

    name: str
    split_name: str
    family: str
    style: str
    templates: tuple[str, ...]
    source: str | None = None
    stress: bool = False
    description: str = ""
    classnames: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classnames", FAMILIES[self.family].classnames)

    @property
    def template(self) -> str:
        return self.templates[0]

    @property
    def test_only(self) -> bool:
        return self.source is not None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def base_classnames(self) -> tuple[str, ...]:
        return self.classnames[: math.ceil(self.num_classes / 2)]

    @property
    def new_classnames(self) -> tuple[str, ...]:
        return self.classnames[math.ceil(self.num_classes / 2) :]

    @property
    def held_out(self) -> tuple[str, ...]:
        """Classes whose composition never occurs in the pre-training corpus."""
        return FAMILIES[self.family].held_out

    def prompts(self, template: str | None = None) -> list[str]:
        """The zero-shot prompt of every class, in label order."""
        return [(template or self.template).format(c) for c in self.classnames]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "split_name": self.split_name,
            "family": self.family,
            "style": self.style,
            "template": self.template,
            "templates": list(self.templates),
            "source": self.source,
            "test_only": self.test_only,
            "stress": self.stress,
            "description": self.description,
            "classnames": list(self.classnames),
            "num_base": len(self.base_classnames),
            "held_out_of_pretraining": list(self.held_out),
        }


# The shapes family's test-only shifts: (name, split name, style, stress set?, description). The first four mirror
# ImageNet's shifts and are the domain-generalisation targets; the stress set is much harsher than any of them.
_SHAPE_SHIFTS = (
    ("shapes_v2", "WorldShapesV2", "scene_v2", False, "a new draw of shapes' look, a little harder (ImageNet-V2)"),
    ("shapes_sketch", "WorldShapesSketch", "sketch", False, "coloured-pencil drawings on paper (ImageNet-Sketch)"),
    ("shapes_r", "WorldShapesR", "rendition", False, "cartoons, paintings, pixel art, neon signs (ImageNet-R)"),
    ("shapes_a", "WorldShapesA", "hard", False, "clutter, grey distractor shapes, occlusion (ImageNet-A)"),
    ("shapes_noise", "WorldShapesNoise", "noisy", True, "stress set: heavy pixel noise, blur and clutter (-C-like)"),
)

_SINGULAR_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a drawing of a {}.", "a {}.")
_PLURAL_TEMPLATES = ("a photo of {}.", "a picture of {}.", "a drawing of {}.", "{}.")

WORLD_DATASETS: dict[str, WorldDataset] = {
    d.name: d
    for d in (
        WorldDataset(
            "shapes",
            "WorldShapes",
            "shapes",
            "scene",
            ("a photo of a {}, a type of shape.", *_SINGULAR_TEMPLATES),
            description="colour x shape on textured backgrounds (the ImageNet analogue: source for cross-dataset "
            "transfer and domain generalisation)",
        ),
        WorldDataset(
            "patterns",
            "WorldPatterns",
            "patterns",
            "scene",
            ("a photo of a {}, a type of pattern.", *_SINGULAR_TEMPLATES),
            description="fill pattern x shape, random colour (the DTD analogue)",
        ),
        WorldDataset(
            "counts",
            "WorldCounts",
            "counts",
            "scene",
            _PLURAL_TEMPLATES,
            description="number x shape, 2-4 scattered objects of one random colour",
        ),
        *(
            WorldDataset(
                name,
                split_name,
                "shapes",
                style,
                ("a photo of a {}, a type of shape.", *_SINGULAR_TEMPLATES),
                source="shapes",
                stress=stress,
                description=description,
            )
            for name, split_name, style, stress, description in _SHAPE_SHIFTS
        ),
    )
}


def list_datasets(include_test_only: bool = True) -> list[str]:
    """Names of the world's downstream datasets (the compositional ones first, then the domain-shifted sets)."""
    return [name for name, d in WORLD_DATASETS.items() if include_test_only or not d.test_only]


def shift_datasets(source: str, include_stress: bool = False) -> list[str]:
    """The test-only shifts of ``source`` (its domain-generalisation targets); stress sets only when asked."""
    return [n for n, d in WORLD_DATASETS.items() if d.source == source and (include_stress or not d.stress)]


def get_dataset(name: str) -> WorldDataset:
    try:
        return WORLD_DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown world dataset {name!r}; available: {list(WORLD_DATASETS)}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Pre-training compositions and captions
# ----------------------------------------------------------------------------------------------------------------------


def pretrain_classnames() -> tuple[str, ...]:
    """The compositions of the pre-training corpus (label order), i.e. every family's classes minus held-out ones."""
    names: list[str] = []
    for family in FAMILIES.values():
        held = set(family.held_out)
        names += [c for c in family.classnames if c not in held]
    return tuple(names)


def pretrain_attributes(classname: str, rng: np.random.Generator) -> Attributes:
    """Complete attributes for a pre-training image of ``classname``, never depicting a held-out composition.

    The nuisance colour of a pattern or count image avoids the held-out colour x shape pairs (patterns and counts
    are plain and single-object where they are not the class, which is never held out).
    """
    attrs = parse_classname(classname)
    if attrs.colour is None:
        held = FAMILIES["shapes"].held_out_cells
        allowed = [c for c in COLOURS if (c, attrs.shape) not in held]
        attrs = replace(attrs, colour=allowed[int(rng.integers(len(allowed)))])
    attrs = attrs.complete(rng)
    if depicts_held_out(attrs):
        raise ValueError(f"{classname!r} is a held-out composition: it has no pre-training images")
    return attrs


def held_out_compositions() -> dict[str, tuple[str, ...]]:
    """Per family, the compositions that never occur in pre-training (images or captions)."""
    return {name: family.held_out for name, family in FAMILIES.items()}


@cache
def family_of(classname: str) -> str:
    for name, family in FAMILIES.items():
        if classname in family.classnames:
            return name
    raise KeyError(f"{classname!r} is not a class of any world family")


# Caption templates: "{np}" is a noun phrase with its article ("a red star", "two stars"); "{kind}" names the family.
PRETRAIN_TEMPLATES: tuple[str, ...] = (
    "{np}.",
    "a photo of {np}.",
    "a picture of {np}.",
    "a drawing of {np}.",
    "{np} on a dark background.",
    "a photo of {np} on a dark background.",
    "{np} in the image.",
)
_KIND_TEMPLATE = "a photo of {np}, a type of {kind}."
_KIND = {"shapes": "shape", "patterns": "pattern"}


def _with_article(phrase: str, count: int) -> str:
    # Always "a" (never "an"), like the benchmarks' "a photo of a {}." templates, to keep the vocabulary small.
    return phrase if count > 1 else f"a {phrase}"


@cache
def caption_choices(classname: str, attrs: Attributes) -> tuple[str, ...]:
    """Every caption the corpus may use for an image of ``classname`` whose full attributes are ``attrs``.

    Short captions name just the class ("a photo of a red star"); attribute-rich ones name everything that was
    drawn ("a small red plain star on a dark background", "three green striped rings").
    """
    family = family_of(classname)
    count = attrs.count or 1
    short = _with_article(classname, count)
    rich = _with_article(attrs.phrase(), count)
    captions = [t.format(np=short) for t in PRETRAIN_TEMPLATES] + [t.format(np=rich) for t in PRETRAIN_TEMPLATES]
    if family in _KIND:
        captions.append(_KIND_TEMPLATE.format(np=short, kind=_KIND[family]))
    return tuple(sorted(set(captions)))


def sample_captions(classname: str, attrs: Attributes, rng: np.random.Generator, k: int = 1) -> list[str]:
    """``k`` distinct captions for one image, drawn from :func:`caption_choices`."""
    choices = caption_choices(classname, attrs)
    idx = rng.choice(len(choices), size=min(k, len(choices)), replace=False)
    return [choices[int(i)] for i in idx]


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z]+")
_ATTRIBUTE_WORDS = frozenset((*COLOURS, *SHAPES, *PLURALS.values(), *PATTERNS, *COUNT_WORDS.values(), *SIZES))
WORLD_SYMBOLS: tuple[str, ...] = (",", ".")


def caption_words(text: str) -> list[str]:
    """The words of a caption or prompt (lower-cased, punctuation dropped)."""
    return _WORD_RE.findall(text.lower())


def parse_caption(text: str) -> Attributes:
    """The attributes a caption names ("a photo of two red striped stars." -> count 2, red, striped, star)."""
    return parse_classname(" ".join(w for w in caption_words(text) if w in _ATTRIBUTE_WORDS))


def _vocabulary() -> tuple[str, ...]:
    words = set(_ATTRIBUTE_WORDS)
    texts = [*PRETRAIN_TEMPLATES, _KIND_TEMPLATE, *_KIND.values()]
    texts += [t for d in WORLD_DATASETS.values() for t in d.templates]
    for text in texts:
        words.update(caption_words(text.replace("{np}", " ").replace("{kind}", " ").replace("{}", " ")))
    return tuple(sorted(words))


WORLD_VOCABULARY: tuple[str, ...] = _vocabulary()
"""Every word that occurs in a class name, caption or prompt template of the world (sorted)."""
