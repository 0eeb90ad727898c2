"""Attribute vocabulary of the synthetic scenes and the words used for them.

The vocabulary is deliberately small (8 colours x 6 shapes x 3 counts x
4 backgrounds x 2 sizes = 1,152 scene identities) so that a tiny CLIP trained
for minutes on 64 px images can learn it; variety comes from the wording
(synonyms, templates, word order), not from the number of concepts.
Every value has a canonical word (used in the attribute caption that stands in
for the image in the bag-of-words fairness check) plus synonyms.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import NamedTuple

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (135, 55, 190),
    "pink": (245, 130, 190),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
COUNTS = (1, 2, 3)
BACKGROUNDS = ("beach", "snow", "night", "park")
SIZES = ("small", "large")

ATTRIBUTES = ("colour", "shape", "count", "background", "size")


class Scene(NamedTuple):
    """The identity of an image: its attribute tuple (rendering adds jitter on top)."""

    colour: str
    shape: str
    count: int
    background: str
    size: str


VALUES: dict[str, tuple] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNTS,
    "background": BACKGROUNDS,
    "size": SIZES,
}
ALL_SCENES: tuple[Scene, ...] = tuple(Scene(*t) for t in itertools.product(*(VALUES[a] for a in ATTRIBUTES)))

# Synonyms: the first entry is canonical.
COLOUR_WORDS = {
    "red": ["red", "scarlet"], "orange": ["orange", "tangerine"], "yellow": ["yellow", "golden"],
    "green": ["green", "lime"], "blue": ["blue", "azure"], "purple": ["purple", "violet"],
    "pink": ["pink", "rosy"], "white": ["white", "ivory"],
}
SHAPE_WORDS = {  # (singular, plural)
    "circle": [("circle", "circles"), ("ball", "balls"), ("disc", "discs")],
    "square": [("square", "squares"), ("box", "boxes"), ("block", "blocks")],
    "triangle": [("triangle", "triangles"), ("wedge", "wedges")],
    "star": [("star", "stars")],
    "heart": [("heart", "hearts")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
}
COUNT_WORDS = {1: ["one", "a single", "just one"], 2: ["two", "a pair of", "a couple of"], 3: ["three", "a trio of"]}
SIZE_WORDS = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
BACKGROUND_WORDS = {  # (noun phrase, preposition phrase)
    "beach": [("beach", "on the beach"), ("seaside", "by the seaside"), ("sand", "on the sand")],
    "snow": [("snow", "in the snow"), ("snowfield", "on a snowfield"), ("ski slope", "on the ski slope")],
    "night": [("night sky", "under the night sky"), ("night", "at night"), ("dark sky", "against a dark sky")],
    "park": [("park", "in the park"), ("lawn", "on the lawn"), ("meadow", "in a meadow")],
}

_NUMBER = {1: "one", 2: "two", 3: "three"}


def neighbours(scene: Scene) -> list[Scene]:
    """Scenes that differ from ``scene`` in exactly one attribute (the hard negatives)."""
    out = []
    for i, attr in enumerate(ATTRIBUTES):
        for v in VALUES[attr]:
            if v != scene[i]:
                out.append(scene._replace(**{attr: v}))
    return out


def differing(a: Scene, b: Scene) -> list[str]:
    """Names of the attributes in which two scenes differ."""
    return [attr for i, attr in enumerate(ATTRIBUTES) if a[i] != b[i]]


def pick(rng: random.Random, options: list, p_canonical: float):
    """The canonical (first) option with probability ``p_canonical``, else a uniformly chosen synonym."""
    if len(options) == 1 or rng.random() < p_canonical:
        return options[0]
    return rng.choice(options[1:])


def shape_word(rng: random.Random, shape: str, plural: bool, p_canonical: float) -> str:
    return pick(rng, SHAPE_WORDS[shape], p_canonical)[1 if plural else 0]


def phrase(rng: random.Random, scene: Scene, p_canonical: float, with_background: bool = True) -> str:
    """``two small red circles [on the beach]`` with synonyms drawn at rate ``1 - p_canonical``."""
    count = pick(rng, COUNT_WORDS[scene.count], p_canonical)
    if scene.count == 1 and count == "one" and rng.random() < 0.3:
        count = "a"
    size = pick(rng, SIZE_WORDS[scene.size], p_canonical)
    colour = pick(rng, COLOUR_WORDS[scene.colour], p_canonical)
    shape = shape_word(rng, scene.shape, scene.count > 1, p_canonical)
    words = [count, size, colour, shape] if rng.random() < 0.7 else [count, colour, size, shape]
    if count == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    text = " ".join(words)
    if with_background:
        text += " " + pick(rng, BACKGROUND_WORDS[scene.background], p_canonical)[1]
    return text


def attribute_caption(scene: Scene) -> str:
    """The canonical caption of a scene: the image's text stand-in for bag-of-words matchers."""
    shape = SHAPE_WORDS[scene.shape][0][1 if scene.count > 1 else 0]
    bg = BACKGROUND_WORDS[scene.background][0][1]
    return f"{_NUMBER[scene.count]} {scene.size} {scene.colour} {shape} {bg}"


def photo_description(scene: Scene) -> str:
    """PhotoChat-style description: a sentence plus the object labels, like the real files."""
    labels = [scene.shape.capitalize(), scene.colour.capitalize(),
              BACKGROUND_WORDS[scene.background][0][0].title()]
    return f"The photo has {attribute_caption(scene)}. Objects in the photo: {', '.join(labels)}"


_CAPTION_TEMPLATES = (
    "{p}",
    "a photo of {p}",
    "a picture showing {pn}, {bgp}",
    "{bgp} there {be} {pn}",
    "{bgn} scene with {pn}",
    "{pn} {bgp}",
    "an image of {pn} against the {bgn}",
    "{bgp}: {pn}",
)


def captions(rng: random.Random, scene: Scene, n: int = 3) -> list[str]:
    """``n`` distinct-template captions with varied wording, for pretraining a small CLIP."""
    out: list[str] = []
    for _ in range(10):  # templates can coincide ("{p}" vs "{pn} {bgp}"): draw until n distinct
        for template in rng.sample(_CAPTION_TEMPLATES, len(_CAPTION_TEMPLATES)):
            bgn, bgp = pick(rng, BACKGROUND_WORDS[scene.background], 0.5)
            text = template.format(p=phrase(rng, scene, 0.5), pn=phrase(rng, scene, 0.5, with_background=False),
                                   bgn=bgn, bgp=bgp, be="is" if scene.count == 1 else "are")
            if text not in out:
                out.append(text)
            if len(out) == n:
                return out
    return out


def attribute_words() -> set[str]:
    """Every word that names an attribute value (to keep filler text free of them)."""
    words: set[str] = set()
    for opts in COLOUR_WORDS.values():
        words.update(opts)
    for opts in SHAPE_WORDS.values():
        for s, p in opts:
            words.update((s, p))
    for opts in SIZE_WORDS.values():
        words.update(opts)
    for opts in BACKGROUND_WORDS.values():
        for noun, _ in opts:
            words.update(noun.split())
    for opts in COUNT_WORDS.values():
        words.update(w for o in opts for w in o.split() if w not in {"a", "of", "just"})
    return words


def value_words(attr: str, value) -> set[str]:
    """Words (lower case) that name one attribute value, synonyms included."""
    if attr == "colour":
        return set(COLOUR_WORDS[value])
    if attr == "shape":
        return {w for pair in SHAPE_WORDS[value] for w in pair}
    if attr == "size":
        return set(SIZE_WORDS[value])
    if attr == "background":
        return {w for noun, _ in BACKGROUND_WORDS[value] for w in noun.split()} - {"sky"}
    if attr == "count":
        return {w for o in COUNT_WORDS[value] for w in o.split() if w not in {"a", "of", "just"}}
    raise KeyError(attr)


_WORD = re.compile(r"[a-z]+")


def words_of(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))
