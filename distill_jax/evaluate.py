"""Measuring text-to-image models: shapes-world accuracy, and GenEval's generation layout.

**Shapes accuracy** (:func:`detect`, :func:`score`, :func:`accuracy`) reads every attribute of a
shapes-world image (:mod:`distill_jax.data.shapes`) straight from its pixels, with no learned
parts:

1. each pixel takes the nearest of the palette's seven colours (background included), so an
   anti-aliased edge splits at half coverage;
2. each colour's 4-connected components of at least :data:`MIN_AREA` pixels are objects;
3. an object's shape is the one (square, circle, upward triangle) that, rendered with the
   object's area at its centroid, overlaps its pixels best (IoU); its position is its centroid.

A prompt's attributes are then checked like GenEval checks its tags: ``count`` (as many objects
as asked for), ``color`` and ``shape`` (the multisets of detected colours and shapes equal the
prompt's), ``position`` (position prompts: the two named objects are found in the named relation,
centres :data:`POSITION_MARGIN` pixels apart) and ``overall`` (the detected (colour, shape)
multiset is exactly the prompt's, and the relation holds). Clean renders score 100%; pure noise
scores near 0 (no object survives the area threshold), see ``tests/test_evaluate.py``.

**GenEval** (:func:`generate_geneval`) writes the folder GenEval's ``evaluate_images.py`` reads:
``<out>/<i:05d>/metadata.jsonl`` (the prompt's metadata line) and ``samples/<j:04d>.png``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from distill_jax import distributed
from distill_jax.data import shapes

log = logging.getLogger(__name__)

MIN_AREA = 10  # pixels; the smallest rendered object (a triangle of side 8) has about 32
POSITION_MARGIN = 2.0  # pixels between centres along the relation's axis
ATTRIBUTES = ("shape", "color", "count", "position", "overall")
_PALETTE = np.asarray([shapes.BACKGROUND, *shapes.COLORS.values()], np.float32)  # [7, 3]
_COLOR_NAMES = (None, *shapes.COLORS)


@dataclasses.dataclass(frozen=True)
class Detected:
    """An object found in an image: colour, shape, centroid (x right, y down) and area, pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    area: int


def _shape_iou(mask: np.ndarray) -> dict[str, float]:
    """IoU of a component's pixels with each shape of the same area and centroid.

    ``mask`` is the component's pixels within its bounding box ``[h, w]``. Each hypothesis is
    rendered as the world renders it (anti-aliased, kept where coverage >= 1/2), its size set by
    the area (square ``s = sqrt(A)``, circle ``s = 2 sqrt(A / pi)``, triangle ``s = sqrt(2 A)``)
    and its centre by the centroid (a triangle's lies ``s / 6`` below its box centre), on a
    window with a margin around the box.
    """
    yy, xx = np.nonzero(mask)
    area, cx, cy = len(yy), xx.mean() + 0.5, yy.mean() + 0.5  # window coordinates
    pad = 4
    h, w = mask.shape[0] + 2 * pad, mask.shape[1] + 2 * pad
    window = np.zeros((h, w), bool)
    window[pad:-pad, pad:-pad] = mask
    k = shapes.SUPERSAMPLE
    y = ((np.arange(h * k) + 0.5) / k - pad)[:, None]
    x = ((np.arange(w * k) + 0.5) / k - pad)[None, :]
    sizes = {
        "square": np.sqrt(area),
        "circle": 2 * np.sqrt(area / np.pi),
        "triangle": np.sqrt(2 * area),
    }
    out = {}
    for name, s in sizes.items():
        centre_y = cy - s / 6 if name == "triangle" else cy
        inside = shapes.shape_mask(name, cx, centre_y, s, x, y)
        template = inside.reshape(h, k, w, k).mean(axis=(1, 3)) >= 0.5
        out[name] = float((window & template).sum() / (window | template).sum())
    return out


def detect(image: np.ndarray, min_area: int = MIN_AREA) -> list[Detected]:
    """The objects of a uint8 ``[H, W, 3]`` shapes-world image, in colour then scan order."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"detect expects one RGB image [H, W, 3], got {list(image.shape)}")
    labels = _palette_labels(image)  # [H, W]; 0 = background
    found = []
    for k in range(1, len(_PALETTE)):
        components, n = ndimage.label(labels == k)  # 4-connectivity
        for box, j in zip(ndimage.find_objects(components), range(1, n + 1), strict=True):
            mask = components[box] == j
            area = int(mask.sum())
            if area < min_area:
                continue
            ious = _shape_iou(mask)
            yy, xx = np.nonzero(mask)
            found.append(
                Detected(
                    color=_COLOR_NAMES[k],
                    shape=max(ious, key=ious.get),
                    cx=float(xx.mean() + 0.5 + box[1].start),
                    cy=float(yy.mean() + 0.5 + box[0].start),
                    area=area,
                )
            )
    return found


def _palette_labels(pixels: np.ndarray) -> np.ndarray:
    """The nearest palette colour of each RGB pixel ``[..., 3]``: ``[...]`` indices into
    ``_PALETTE``, 0 the background."""
    d = np.asarray(pixels, np.float32)[..., None, :] - _PALETTE  # [..., 7, 3]
    return np.argmin(np.einsum("...kc,...kc->...k", d, d), axis=-1)


def background_noise(images: np.ndarray) -> np.ndarray:
    """Mean ``|pixel - 128|`` over each image's background pixels, per image ``[N]`` float
    (0 for a clean render): a film of noise that leaves the objects readable still shows here.

    Background pixels are those whose nearest palette colour is the background grey and whose 8
    neighbours are too (anti-aliased edges are not background); an image with none gives NaN.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"background_noise expects images [N, H, W, 3], got {list(images.shape)}")
    x = images.astype(np.float32)
    grey = _palette_labels(images) == 0  # [N, H, W]
    inner = ndimage.binary_erosion(grey, structure=np.ones((1, 3, 3), bool), border_value=1)
    dev = np.abs(x - np.asarray(shapes.BACKGROUND, np.float32)).mean(-1)  # [N, H, W]
    count = inner.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (dev * inner).sum((1, 2)) / count, np.nan)


def score(prompt: shapes.Prompt, found: Sequence[Detected]) -> dict[str, bool | None]:
    """Each attribute of :data:`ATTRIBUTES` right (True), wrong (False) or not asked (None)."""
    want = collections.Counter((o.color, o.shape) for o in prompt.objects)
    got = collections.Counter((d.color, d.shape) for d in found)
    out: dict[str, bool | None] = {
        "shape": sorted(s for _, s in want.elements()) == sorted(s for _, s in got.elements()),
        "color": sorted(c for c, _ in want.elements()) == sorted(c for c, _ in got.elements()),
        "count": len(found) == len(prompt.objects),
        "position": None,
    }
    if prompt.relation is not None:
        a, b = prompt.objects[:2]
        out["position"] = any(
            shapes.relation_holds((p.cx, p.cy), (q.cx, q.cy), prompt.relation, POSITION_MARGIN)
            for p in found
            if (p.color, p.shape) == (a.color, a.shape)
            for q in found
            if q is not p and (q.color, q.shape) == (b.color, b.shape)
        )
    out["overall"] = want == got and out["position"] is not False
    return out


def accuracy(scores: Sequence[dict[str, bool | None]], tags: Sequence[str] | None = None) -> dict:
    """Mean of each attribute over the images that ask for it (``None`` when none does), and
    with ``tags`` the overall accuracy per prompt tag under ``"by_tag"``."""
    out: dict[str, Any] = {}
    for a in ATTRIBUTES:
        asked = [s[a] for s in scores if s[a] is not None]
        out[a] = float(np.mean(asked)) if asked else None
    if tags is not None:
        out["by_tag"] = {
            t: float(np.mean([s["overall"] for s, g in zip(scores, tags, strict=True) if g == t]))
            for t in shapes.TAGS
            if t in tags
        }
    return out


def evaluate_images(
    images: np.ndarray, prompts: Sequence[shapes.Prompt]
) -> tuple[dict, list[dict[str, bool | None]]]:
    """``(accuracy summary, per-image scores)`` of uint8 ``[N, H, W, 3]`` against ``N`` prompts."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    scores = [score(p, detect(im)) for p, im in zip(prompts, images, strict=True)]
    return accuracy(scores, [p.tag for p in prompts]), scores


# --- GenEval --------------------------------------------------------------------------------

GENEVAL_SAMPLES = 4  # images per prompt, as GenEval and the paper's scripts


def read_geneval_metadata(path: str | Path) -> list[dict]:
    """The lines of GenEval's ``evaluation_metadata.jsonl``; each needs a ``"prompt"``."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: a metadata line needs a string 'prompt' field")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def _sampler(checkpoint: str | Path, *, method: str, steps: int, guidance, size, batch_size):
    """``images(prompts, seed) -> uint8 [N, size, size, 3]`` of a converted or toy pipeline."""
    from distill_jax.folders import load_pipeline
    from distill_jax.pipeline.generate import generate

    pipe = load_pipeline(checkpoint)
    return lambda prompts, seed: generate(
        pipe,
        prompts,
        height=size,
        width=size,
        steps=steps,
        guidance=guidance,
        seed=seed,
        method=method,
        batch_size=batch_size,
    )


def generate_geneval(
    checkpoint: str | Path,
    metadata_path: str | Path,
    out_dir: str | Path,
    *,
    method: str = "teacher",
    steps: int = 28,
    guidance: float | None = 3.5,
    size: int = 512,
    samples: int = GENEVAL_SAMPLES,
    seed: int = 42,
    batch_size: int | None = None,
) -> dict:
    """GenEval's generation step: ``samples`` images for every prompt of ``metadata_path``.

    Writes ``out_dir/<i:05d>/metadata.jsonl`` (line ``i`` of the metadata, as GenEval's own
    generation script) and ``out_dir/<i:05d>/samples/<j:04d>.png``. Each prompt folder is written
    under a temporary name and renamed when complete, so an interrupted run resumes where it
    stopped: finished folders are kept, never redone. Prompt ``i`` draws its noise from
    ``seed + i`` alone, so a resumed run writes the same images as an uninterrupted one.

    Args:
      checkpoint: a converted pipeline folder (``distill-jax convert``, possibly with a
        distilled transformer) or a toy pipeline folder (``WORKDIR/student`` of a shapes run,
        :func:`distill_jax.folders.save_toy`).
      method, steps, guidance: the sampler (see :func:`distill_jax.pipeline.generate.generate`);
        the toy takes ``guidance=None``.
      size: image side in pixels (the toy was trained at 32).
      batch_size: images per sampler call (default: ``samples``, one prompt per call).
    On several hosts (``distill-jax geneval --multihost``), host ``p`` of ``P`` takes prompts
    ``p, p + P, ...`` on its own devices; the folder must be shared (or gathered afterwards).

    Returns:
      ``{"prompts", "generated", "skipped", "seconds"}``: all prompts, and this host's generated
      and already-present ones.
    """
    from distill_jax.pipeline.generate import SEED_LIMIT, check_request

    rows = read_geneval_metadata(metadata_path)
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    prompts = [r["prompt"] for r in rows]
    check_request(prompts, height=size, width=size, steps=steps, guidance=guidance, seed=seed)
    if seed + len(rows) > SEED_LIMIT:
        raise ValueError(f"seed={seed}: prompt i draws seed + i, past {SEED_LIMIT - 1}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = distributed.my_share(len(rows))  # every prompt on exactly one host
    todo = [i for i in mine if not (out / f"{i:05d}").is_dir()]
    index, count = distributed.process()
    log.info(
        "geneval: %d prompts, host %d of %d takes %d, %d of them already done in %s; %s, "
        "%d step(s), guidance %s",
        len(rows),
        index,
        count,
        len(mine),
        len(mine) - len(todo),
        out,
        method,
        steps,
        guidance,
    )
    start = time.perf_counter()
    if todo:
        images_of = _sampler(
            checkpoint,
            method=method,
            steps=steps,
            guidance=guidance,
            size=size,
            batch_size=batch_size or samples,
        )
    bar = tqdm(
        todo, desc="geneval", unit="prompt", disable=not todo or not distributed.is_primary()
    )
    for i in bar:
        images = images_of([rows[i]["prompt"]] * samples, seed + i)
        tmp = out / f".{i:05d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
        (tmp / "samples").mkdir(parents=True)
        (tmp / "metadata.jsonl").write_text(json.dumps(rows[i]) + "\n")
        for j, image in enumerate(images):
            Image.fromarray(image).save(tmp / "samples" / f"{j:04d}.png")
        tmp.rename(out / f"{i:05d}")
    seconds = time.perf_counter() - start
    distributed.sync("geneval-done")  # the folder is complete when any host returns
    return {
        "prompts": len(rows),
        "generated": len(todo),
        "skipped": len(mine) - len(todo),
        "seconds": seconds,
    }


__all__ = [
    "ATTRIBUTES",
    "Detected",
    "accuracy",
    "detect",
    "evaluate_images",
    "generate_geneval",
    "read_geneval_metadata",
    "score",
]
