"""The shapes world: a procedural text-to-image dataset that a laptop can learn and measure.

Images are 32x32 RGB pictures of coloured shapes (circle, square, triangle in six well-separated
colours) on a plain grey background, one shape per cell of a 2x2 grid, each picture with a
caption from a few templates that cover what GenEval measures:

=============  ======================================  ==========================
tag            caption                                 what it tests
=============  ======================================  ==========================
single         "a red circle"                          object type and colour
counting       "three blue squares"                    count (2 or 3)
two_object     "a red circle and a green triangle"     two objects
position       "a red circle left of a blue square"    relative position
=============  ======================================  ==========================

Composition is measured by holding out: :data:`HELD_OUT_PAIRS` (three colour-shape pairs) never
occur in the training split, nor does a fixed tenth of the other prompts; the ``eval`` split is
exactly those prompts. Everything is a pure function of ``(seed, index)``.

Pixels are uint8 ``[H, W, 3]``; the toy model sees them through its linear autoencoder
(:class:`distill_jax.pipeline.toy.Autoencoder`). Shapes are rendered with 4x4 supersampling: a
pixel is the background blended with its object's colour by the fraction of the pixel the
object covers. Objects never touch (a gap of at least
:data:`GAP` pixels), so every object is one connected component of one colour (what
:mod:`distill_jax.evaluate` relies on). Why a coarse grid: a diffusion model learns what a
caption asks for from the average image the caption implies at high noise, and an object that can
sit in any of k cells contributes 1/k of itself to that average. With 16 cells (6-pixel shapes)
the toy teacher drew clean shapes but mostly ignored the caption (4% overall after 2000 steps);
with 4 cells (12-pixel shapes) it reached 13% by then. The shipped teacher sees each cell as
one token and scores 98.8% on held-out prompts, held-out colour-shape pairs and relative
positions included (README, *The demo*).

The TFDS copy (:func:`build_shapes_dataset`) is written with the generic builder of
:mod:`distill_jax.data.builders` and read back with ``tfds.builder_from_directory``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

SIZE = 32  # pixels per side
SUPERSAMPLE = 4
CELL = 16  # objects sit in the cells of a 2x2 grid (each cell 2x2 toy tokens of 8x8 pixels)
OBJECT = 12.0  # object size (bounding-box side) in pixels, centred in its cell
GAP = CELL - OBJECT  # minimum pixels between two objects' bounding boxes
BACKGROUND = (128, 128, 128)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single", "counting", "two_object", "position")
NUMBERS = {2: "two", 3: "three"}
# Never in training: one colour per shape, so every colour and every shape is still seen.
HELD_OUT_PAIRS = frozenset({("blue", "triangle"), ("yellow", "circle"), ("magenta", "square")})
HELD_OUT_FRACTION = 0.1  # of the remaining prompts, also kept for evaluation only
SPLITS = ("train", "eval")

# Word-level vocabulary of every caption; id 0 pads.
VOCAB: tuple[str, ...] = (
    "<pad>",
    "a",
    "and",
    *NUMBERS.values(),
    "left",
    "right",
    "of",
    "above",
    "below",
    *COLORS,
    *SHAPES,
    *(s + "s" for s in SHAPES),
)
TEXT_LEN = 8  # the longest caption: "a red circle left of a blue square"


@dataclasses.dataclass(frozen=True, order=True)
class Obj:
    color: str
    shape: str

    def __post_init__(self):
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; the world has {list(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; the world has {list(SHAPES)}")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A caption and the attributes it asks for.

    ``objects`` lists every object the image must hold (a counting prompt repeats one object);
    ``relation`` (position prompts) relates ``objects[0]`` to ``objects[1]``.
    """

    tag: str
    objects: tuple[Obj, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        o = self.objects
        if self.tag == "single":
            return f"a {o[0].color} {o[0].shape}"
        if self.tag == "counting":
            return f"{NUMBERS[len(o)]} {o[0].color} {o[0].shape}s"
        if self.tag == "two_object":
            return f"a {o[0].color} {o[0].shape} and a {o[1].color} {o[1].shape}"
        return f"a {o[0].color} {o[0].shape} {self.relation} a {o[1].color} {o[1].shape}"

    def to_json(self) -> dict:
        return {
            "tag": self.tag,
            "text": self.text,
            "objects": [dataclasses.asdict(o) for o in self.objects],
            "relation": self.relation,
        }

    @classmethod
    def from_json(cls, d: dict) -> Prompt:
        return cls(d["tag"], tuple(Obj(**o) for o in d["objects"]), d.get("relation"))


@dataclasses.dataclass(frozen=True)
class Placed:
    """An object in an image: centre (x right, y down) and bounding-box side, in pixels."""

    obj: Obj
    cx: float
    cy: float
    size: float


# --- prompts and splits ---------------------------------------------------------------------


@functools.cache
def all_prompts() -> tuple[Prompt, ...]:
    """Every prompt of the world (1584), in a fixed order."""
    objs = [Obj(c, s) for c in COLORS for s in SHAPES]
    out = [Prompt("single", (o,)) for o in objs]
    out += [Prompt("counting", (o,) * n) for o in objs for n in NUMBERS]
    pairs = [(a, b) for a, b in itertools.permutations(objs, 2)]
    out += [Prompt("two_object", p) for p in pairs]
    out += [Prompt("position", p, r) for p in pairs for r in RELATIONS]
    return tuple(out)


def _hash01(text: str) -> float:
    """A platform-independent uniform number in [0, 1) from a string."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def is_held_out(prompt: Prompt) -> bool:
    """Whether ``prompt`` belongs to the eval split (never seen in training)."""
    if any((o.color, o.shape) in HELD_OUT_PAIRS for o in prompt.objects):
        return True
    return _hash01(prompt.text) < HELD_OUT_FRACTION


@functools.cache
def split_prompts(split: str) -> tuple[Prompt, ...]:
    """The prompts of ``"train"`` or ``"eval"`` (disjoint; together :func:`all_prompts`)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    return tuple(p for p in all_prompts() if is_held_out(p) == (split == "eval"))


def eval_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """``n`` held-out prompts, tags in turn (a quarter each, as GenEval averages over its tags).

    Each tag's prompts come in a seeded order; a tag with fewer than ``n / 4`` held-out prompts
    (single: 6, counting: 10) starts over, so its prompts recur, each time with other noise.
    The same ``(n, seed)`` always gives the same list.
    """
    rng = np.random.default_rng(seed)
    by_tag = {t: [p for p in split_prompts("eval") if p.tag == t] for t in TAGS}
    for t in TAGS:
        rng.shuffle(by_tag[t])
    return [by_tag[TAGS[i % 4]][(i // 4) % len(by_tag[TAGS[i % 4]])] for i in range(n)]


# --- layout and rendering -------------------------------------------------------------------


def _overlap(a: Placed, b: Placed, gap: float = GAP) -> bool:
    need = (a.size + b.size) / 2 + gap
    return abs(a.cx - b.cx) < need and abs(a.cy - b.cy) < need


def relation_holds(a: Placed | tuple[float, float], b, relation: str, margin: float) -> bool:
    """Whether ``a`` is ``relation`` ``b``, centres compared with a ``margin`` in pixels."""
    (ax, ay), (bx, by) = ((p.cx, p.cy) if isinstance(p, Placed) else p for p in (a, b))
    return {
        "left of": bx - ax > margin,
        "right of": ax - bx > margin,
        "above": by - ay > margin,
        "below": ay - by > margin,
    }[relation]


def layout(prompt: Prompt, rng: np.random.Generator, size: int = SIZE) -> list[Placed]:
    """Random placements of the prompt's objects: one object per cell of the ``CELL``-pixel
    grid, each ``OBJECT`` pixels wide and centred in its cell (so objects never touch).

    Few cells keep the world learnable for a model trained on a CPU (see the module
    docstring) while still asking for object types, colours, counts and positions. A position
    prompt puts its second object at least one cell away along the relation's axis and at most
    one cell off across it.
    """
    n = size // CELL
    for _ in range(1000):
        cells = [tuple(rng.integers(0, n, 2))]  # (row, col)
        if prompt.relation is not None:
            r, c = cells[0]
            along, across = rng.integers(1, n), rng.integers(-1, 2)
            sign = 1 if prompt.relation in ("left of", "above") else -1
            if prompt.relation in ("left of", "right of"):
                cells.append((r + across, c + sign * along))
            else:
                cells.append((r + sign * along, c + across))
        while len(cells) < len(prompt.objects):
            cells.append(tuple(rng.integers(0, n, 2)))
        if len(set(cells)) == len(cells) and all(0 <= v < n for cell in cells for v in cell):
            return [
                Placed(obj, float((c + 0.5) * CELL), float((r + 0.5) * CELL), OBJECT)
                for obj, (r, c) in zip(prompt.objects, cells, strict=True)
            ]
    raise RuntimeError(f"could not lay out {prompt.text!r} in {size}x{size} pixels")


def shape_mask(shape: str, cx: float, cy: float, s: float, x: np.ndarray, y: np.ndarray):
    """Boolean inside-test of a shape of bounding-box side ``s`` centred at ``(cx, cy)`` on the
    sample coordinates ``x, y`` (pixel units, broadcastable). Triangles point up."""
    h = s / 2
    if shape == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    if shape == "triangle":
        depth = y - (cy - h)  # from the apex down
        return (depth >= 0) & (depth <= s) & (np.abs(x - cx) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=4096)
def _coverage(shape: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """Fraction of each pixel a shape covers, float32 ``[size, size, 1]`` (4x4 supersampled).
    Cached: objects sit at a few fixed places, so training renders cost a blend, not a raster."""
    k = SUPERSAMPLE
    c = (np.arange(size * k) + 0.5) / k  # sample positions in pixel units
    mask = shape_mask(shape, cx, cy, s, c[None, :], c[:, None])
    out = mask.reshape(size, k, size, k).mean(axis=(1, 3), dtype=np.float32)[..., None]
    out.flags.writeable = False
    return out


def render(placed: Sequence[Placed], size: int = SIZE) -> np.ndarray:
    """uint8 ``[size, size, 3]`` of the objects on the background, anti-aliased."""
    img = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (size, size, 3)).copy()
    for p in placed:
        alpha = _coverage(p.obj.shape, p.cx, p.cy, p.size, size)
        img = img * (1 - alpha) + np.asarray(COLORS[p.obj.color], np.float32) * alpha
    return np.round(img).astype(np.uint8)


# --- the source -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: Prompt
    placed: tuple[Placed, ...]
    image: np.ndarray  # uint8 [SIZE, SIZE, 3]


class ShapesSource:
    """Random-access examples of one split: record ``i`` is a pure function of ``(seed, i)``.

    A record's prompt is drawn uniformly over the split's tags, then uniformly within the tag
    (so the few single and counting prompts are not drowned by the many position prompts).
    """

    def __init__(self, split: str = "train", *, seed: int = 0, size: int = 1 << 20):
        self.split, self.seed, self.size = split, seed, size
        prompts = split_prompts(split)
        self.by_tag = [[p for p in prompts if p.tag == t] for t in TAGS]
        self.by_tag = [ps for ps in self.by_tag if ps]

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> Example:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} outside [0, {self.size})")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        prompts = self.by_tag[rng.integers(len(self.by_tag))]
        prompt = prompts[rng.integers(len(prompts))]
        placed = tuple(layout(prompt, rng))
        return Example(prompt, placed, render(placed))

    def __getitem__(self, index: int) -> dict:
        """``{"image": uint8 [H, W, 3], "caption": str, "attributes": JSON str, "index"}``."""
        ex = self.example(index)
        return {
            "image": ex.image,
            "caption": ex.prompt.text,
            "attributes": json.dumps(
                {**ex.prompt.to_json(), "placed": [dataclasses.asdict(p) for p in ex.placed]}
            ),
            "index": int(index),
        }


def render_prompts(prompts: Sequence[Prompt], seed: int = 0) -> np.ndarray:
    """One clean render per prompt, uint8 ``[N, H, W, 3]`` (image ``i`` from ``(seed, i)``)."""
    out = []
    for i, p in enumerate(prompts):
        rng = np.random.default_rng([seed, 2, i])
        out.append(render(layout(p, rng)))
    return np.stack(out)


# --- the TFDS copy --------------------------------------------------------------------------

DATASET_NAME = "shapes_world"


def shapes_features():
    """The image-caption layout of :func:`distill_jax.data.builders.image_features` (PNG bytes,
    caption, key), plus each record's attributes as JSON."""
    import tensorflow_datasets as tfds

    from distill_jax.data.builders import image_features

    return tfds.features.FeaturesDict(
        {**dict(image_features().items()), "attributes": tfds.features.Text()}
    )


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def build_shapes_dataset(
    out_dir: str | Path,
    *,
    split: str = "train",
    num_examples: int = 10_000,
    seed: int = 0,
    shard_size: int = 2_000,
):
    """Writes records ``0 .. num_examples - 1`` of ``ShapesSource(split, seed=seed)`` as a TFDS
    dataset (array_record), resumably; returns the builder's
    :class:`~distill_jax.data.builders.WriteReport`.

    Images are stored as PNG with their captions, as an image-caption dataset, so
    :func:`distill_jax.data.input_pipeline.make_dataset` (``resolution=32``) and ``prepare``
    read it like any other; ``attributes`` holds the prompt and the placements as JSON.
    """
    from distill_jax.data.builders import write_dataset

    source = ShapesSource(split, seed=seed, size=num_examples)

    def read_shard(records: range) -> Iterable[dict]:
        for i in records:
            row = source[i]
            yield {
                "image": _png(row["image"]),
                "caption": row["caption"],
                "key": f"{split}-{seed}-{i:08d}",
                "attributes": row["attributes"],
            }

    world = {"split": split, "seed": seed, "size": SIZE, "vocab": list(VOCAB)}
    return write_dataset(
        out_dir,
        name=DATASET_NAME,
        features=shapes_features(),
        num_records=num_examples,
        read_shard=read_shard,
        shard_size=shard_size,
        metadata={"world": world, "held_out_pairs": sorted(map(list, HELD_OUT_PAIRS))},
        plan=world,
        description="The shapes world (distill_jax.data.shapes): coloured shapes with captions.",
    )


__all__ = [
    "COLORS",
    "HELD_OUT_PAIRS",
    "RELATIONS",
    "SHAPES",
    "SIZE",
    "TAGS",
    "TEXT_LEN",
    "VOCAB",
    "Example",
    "Obj",
    "Placed",
    "Prompt",
    "ShapesSource",
    "all_prompts",
    "build_shapes_dataset",
    "eval_prompts",
    "is_held_out",
    "layout",
    "relation_holds",
    "render",
    "render_prompts",
    "split_prompts",
]
