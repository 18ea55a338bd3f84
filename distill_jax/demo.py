"""The embedded default: distil the shipped toy teacher with sCM and MeanFlow and measure them.

:func:`run_demo` runs the project end to end on a laptop CPU in minutes:

1. loads the toy teacher of the shapes world (:mod:`distill_jax.pipeline.toy`, shipped in the
   package) with ``load_pipeline``;
2. distils it with sCM and with MeanFlow through the project's one training loop
   (:func:`distill_jax.train.train` on the shapes input, ``toy_config(method)``), which writes
   each student as a toy pipeline folder;
3. samples the teacher at 1, 2, 4, ... up to its full number of Euler steps and each student
   at 1, 2 and 4 steps with :func:`~distill_jax.pipeline.generate.generate` on the same
   held-out prompts and noise (one seed), and scores every image with
   :mod:`distill_jax.evaluate`;
4. writes ``report.json`` (every number, and every sample's prompt, attributes, scores and
   image path, so any result can be re-scored), ``report.md`` (the table), ``samples.png`` (the
   same prompts across models), ``accuracy.png`` (overall accuracy against steps, goals marked)
   and prints the table. Each row also carries the samples' background noise
   (:func:`distill_jax.evaluate.background_noise`), a film of noise the accuracy misses.

The work directory keeps the students' training checkpoints: a second call resumes or reuses
them instead of training again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from distill_jax import evaluate
from distill_jax.config import toy_config
from distill_jax.data import shapes
from distill_jax.folders import load_pipeline
from distill_jax.pipeline import toy
from distill_jax.pipeline.generate import generate

log = logging.getLogger(__name__)

METHODS = ("scm", "meanflow")
STUDENT_STEPS = (1, 2, 4)
# What the demo is expected to reach: the student's overall accuracy relative to the teacher's
# at its full number of steps (sCM is the paper's 1-2-step method, MeanFlow its 4-step one).
# The paper's GenEval ratios on FLUX.1-lite: sCM 0.81 / 0.99 at 1 / 2 steps, MeanFlow 0.96 /
# 0.55 at 4 / 2 steps.
TARGETS = {("scm", 1): 0.90, ("scm", 2): 0.98, ("meanflow", 4): 0.97, ("meanflow", 2): 0.85}
# A student's samples are as clean as the teacher's when their background noise
# (evaluate.background_noise) is at most this multiple of the teacher's at its full steps.
NOISE_GOAL = 2.0
# train_steps / train_batch None: as toy_config(method) says.
QUICK = dict(num_prompts=8, train_steps=4, train_batch=8, sample_batch=8, grid_prompts=4)
FULL = dict(num_prompts=512, train_steps=None, train_batch=None, sample_batch=128, grid_prompts=8)


@dataclasses.dataclass
class _Result:
    model: str
    sampler: str
    steps: int
    images: np.ndarray
    accuracy: dict
    scores: list
    seconds_per_image: float
    background_noise: float  # mean over images of evaluate.background_noise


def _evaluate(pipe, prompts, *, model, sampler, steps, seed, batch_size) -> _Result:
    """Samples every prompt once and scores it. Seconds per image exclude the first batch (its
    compilations) unless there is only one batch."""
    timings: list[float] = []
    images = generate(
        pipe,
        [p.text for p in prompts],
        height=shapes.SIZE,
        width=shapes.SIZE,
        steps=steps,
        guidance=None,
        seed=seed,
        method=sampler,
        batch_size=batch_size,
        timings=timings,
    )
    bs = min(batch_size, len(prompts))
    timed = timings[1:] or timings
    per_image = sum(timed) / (len(timed) * bs)
    summary, scores = evaluate.evaluate_images(images, prompts)
    noise = float(np.nanmean(evaluate.background_noise(images)))
    log.info(
        "demo: %s %d step(s): overall %.3f, background noise %.1f, %.4f s/image",
        model,
        steps,
        summary["overall"],
        noise,
        per_image,
    )
    return _Result(model, sampler, steps, images, summary, scores, per_image, noise)


def measure_toy(
    pipe: toy.ToyPipeline,
    *,
    steps: int = toy.TEACHER_STEPS,
    num_prompts: int = 512,
    seed: int = 0,
    sampler: str = "teacher",
    batch_size: int = 128,
) -> dict[str, Any]:
    """Held-out accuracy of a toy pipeline as the demo measures it: ``num_prompts`` prompts of
    :func:`~distill_jax.data.shapes.eval_prompts` (``seed``), one image each at ``steps`` steps
    of ``sampler``, and the samples' mean background noise. What a toy teacher's ``toy.json``
    records under ``evaluation``."""
    prompts = shapes.eval_prompts(num_prompts, seed=seed)
    res = _evaluate(
        pipe, prompts, model=sampler, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size
    )
    return {
        "split": "eval",
        "prompts": num_prompts,
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "accuracy": res.accuracy,
        "background_noise": res.background_noise,
    }


def _distil(teacher: Path, method: str, workdir: Path, opts: dict, seed: int):
    """Trains a ``method`` student of the teacher folder in ``workdir/method`` (resuming what is
    there), which writes it to ``workdir/method/student``; returns ``(student pipeline, logged
    metrics, seconds, config)``."""
    from distill_jax.train import train

    config = toy_config(method)
    config.seed = config.data.shuffle_seed = seed
    config.teacher.path = str(teacher)
    if opts["train_steps"]:
        config.total_steps = opts["train_steps"]
        config.log_every = max(1, min(config.log_every, opts["train_steps"] // 2))
        config.checkpoint_every = opts["train_steps"]
    if opts["train_batch"]:
        config.data.batch_size = opts["train_batch"]
    start = time.perf_counter()
    run = train(config, workdir / method)
    seconds = time.perf_counter() - start
    return load_pipeline(workdir / method / "student"), run.metrics, seconds, config


def _grid(results: Sequence[_Result], n: int, path: Path) -> None:
    """Rows = models, columns = the first ``n`` prompts; 32-pixel images shown 3x."""
    scale, label_w = 3, 150
    tile = shapes.SIZE * scale
    canvas = Image.new("RGB", (label_w + n * (tile + 2), len(results) * (tile + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, res in enumerate(results):
        y = r * (tile + 2)
        label = f"{res.model}, {res.steps} step" + ("s" if res.steps > 1 else "")
        draw.text((4, y + tile // 2 - 6), label, fill="black")
        for c, image in enumerate(res.images[:n]):
            im = Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(im, (label_w + c * (tile + 2), y))
    canvas.save(path)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(rows: Sequence[dict]) -> str:
    """A Markdown table of the results (accuracies in %)."""
    head = ["model", "steps", *evaluate.ATTRIBUTES, "vs teacher", "bg noise", "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        acc = row["accuracy"]
        cells = [row["model"], str(row["steps"]), *(_pct(acc[a]) for a in evaluate.ATTRIBUTES)]
        cells += [_pct(row["relative_to_teacher"]), f"{row['background_noise']:.1f}"]
        cells += [f"{row['seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teacher_steps(full_steps: int) -> list[int]:
    """The teacher's step counts in the report: powers of two up to its full count, and it."""
    powers = (2**k for k in range(full_steps.bit_length()) if 2**k <= full_steps)
    return sorted({*powers, full_steps})


def _phase(i: int, n: int, what: str) -> None:
    print(f"demo [{i}/{n}]: {what}", flush=True)


_COLORS = {"teacher": (40, 40, 40), "scm": (31, 119, 180), "meanflow": (255, 127, 14)}


def plot_accuracy(rows: Sequence[dict], path: Path, size: tuple[int, int] = (640, 420)) -> None:
    """Overall accuracy (%) against the number of steps (log2 axis): one line per model, each
    goal of :data:`TARGETS` as a hollow marker at its fraction of the teacher's full-step
    accuracy, written as a PNG of ``size`` pixels."""
    w, h = size
    left, right, top, bottom = 60, 130, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    steps = sorted({r["steps"] for r in rows})
    lo, hi = math.log2(steps[0]), math.log2(steps[-1]) or 1.0

    def xy(step: float, acc: float) -> tuple[float, float]:
        fx = (math.log2(step) - lo) / (hi - lo) if hi > lo else 0.5
        return left + fx * (w - left - right), top + (1 - acc) * (h - top - bottom)

    for k in range(0, 101, 20):  # horizontal grid and y labels
        _, y = xy(steps[0], k / 100)
        draw.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        draw.text((left - 32, y - 6), f"{k}%", fill="black")
    for n in steps:  # x ticks
        x, _ = xy(n, 0)
        draw.line([(x, h - bottom), (x, h - bottom + 4)], fill="black")
        draw.text((x - 4, h - bottom + 8), str(n), fill="black")
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    draw.text((left + (w - left - right) // 2 - 40, h - 20), "sampling steps", fill="black")
    draw.text((left, 8), "overall accuracy on held-out prompts", fill="black")
    reference = max(
        (r for r in rows if r["model"] == "teacher"), key=lambda r: r["steps"], default=None
    )
    models = list(dict.fromkeys(r["model"] for r in rows))
    for j, model in enumerate(models):
        color = _COLORS.get(model, (120, 120, 120))
        pts = [xy(r["steps"], r["accuracy"]["overall"]) for r in rows if r["model"] == model]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = top + 10 + 18 * j
        draw.line([(w - right + 10, ly), (w - right + 30, ly)], fill=color, width=2)
        draw.text((w - right + 35, ly - 6), model, fill="black")
    if reference is not None:
        for (model, n), goal in TARGETS.items():
            if model in models and n in steps:
                x, y = xy(n, goal * reference["accuracy"]["overall"])
                draw.rectangle([x - 5, y - 5, x + 5, y + 5], outline=_COLORS.get(model), width=2)
        ly = top + 10 + 18 * len(models)
        draw.rectangle([w - right + 15, ly - 5, w - right + 25, ly + 5], outline="black", width=2)
        draw.text((w - right + 35, ly - 6), "goal", fill="black")
    img.save(path)


def run_demo(
    workdir: str | Path,
    *,
    quick: bool = False,
    teacher: str | Path = toy.TEACHER_PATH,
    methods: Sequence[str] = METHODS,
    num_prompts: int | None = None,
    train_steps: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Distils the toy teacher with each of ``methods`` and writes the comparison to ``workdir``.

    Args:
      workdir: output folder: ``report.json``, ``report.md``, ``samples.png``, ``images/`` and
        the students (``<method>/checkpoints``, ``<method>/student``).
      quick: a shortened run for tests (8 prompts, 4 training steps per student).
      teacher: a toy pipeline folder (default: the shipped teacher).
      methods: distillation methods, any of ``"scm"``, ``"meanflow"``.
      num_prompts: held-out prompts to evaluate (default 512; quick 8).
      train_steps: training steps per student (default: ``toy_config(method)``; quick 4).
      seed: seed of the prompts' noise and of the students' training.
    Returns:
      The report (also written to ``report.json``).
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"run_demo: unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    opts = dict(QUICK if quick else FULL)
    opts["num_prompts"] = num_prompts or opts["num_prompts"]
    opts["train_steps"] = train_steps or opts["train_steps"]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = load_pipeline(teacher)
    meta = json.loads((Path(teacher) / toy.META_FILE).read_text())
    full_steps = int(meta.get("teacher_steps", toy.TEACHER_STEPS))
    prompts = shapes.eval_prompts(opts["num_prompts"], seed=seed)
    kw = dict(seed=seed, batch_size=opts["sample_batch"])

    phases = 1 + 2 * len(methods)
    _phase(1, phases, f"sampling the teacher at {teacher_steps(full_steps)} Euler steps")
    results = [
        _evaluate(pipe, prompts, model="teacher", sampler="teacher", steps=n, **kw)
        for n in teacher_steps(full_steps)
    ]
    training = {}
    for i, method in enumerate(methods):
        _phase(2 + 2 * i, phases, f"distilling the teacher with {method}")
        student, metrics, seconds, config = _distil(Path(teacher), method, workdir, opts, seed)
        training[method] = {
            "steps": config.total_steps,
            "batch_size": config.data.batch_size,
            "lr": config.optim.lr,
            "seconds": round(seconds, 1),
            "final_loss": metrics[-1]["train/loss"] if metrics else None,
            "config": json.loads(config.to_json_best_effort()),
        }
        _phase(3 + 2 * i, phases, f"sampling the {method} student at {STUDENT_STEPS} steps")
        results += [
            _evaluate(student, prompts, model=method, sampler=method, steps=n, **kw)
            for n in STUDENT_STEPS
        ]

    reference = next(r for r in results if r.model == "teacher" and r.steps == full_steps)
    rows = []
    for res in results:
        folder = Path("images") / f"{res.model}_{res.steps}"
        (workdir / folder).mkdir(parents=True, exist_ok=True)
        samples = []
        for i, (p, image, s) in enumerate(zip(prompts, res.images, res.scores, strict=True)):
            Image.fromarray(image).save(workdir / folder / f"{i:04d}.png")
            samples.append(
                {"prompt": p.text, "attributes": p.to_json(), "image": str(folder / f"{i:04d}.png")}
                | {"scores": s}
            )
        ref = reference.accuracy["overall"]
        rows.append(
            {
                "model": res.model,
                "sampler": res.sampler,
                "steps": res.steps,
                "accuracy": res.accuracy,
                "relative_to_teacher": res.accuracy["overall"] / ref if ref else None,
                "background_noise": res.background_noise,
                "seconds_per_image": res.seconds_per_image,
                "samples": samples,
            }
        )
    targets = {}
    for (method, steps), goal in TARGETS.items():
        row = next((r for r in rows if r["model"] == method and r["steps"] == steps), None)
        if row is not None:
            rel = row["relative_to_teacher"]
            targets[f"{method}_{steps}_step"] = {
                "relative_to_teacher": rel,
                "goal": goal,
                "met": rel is not None and rel >= goal,
            }
    teacher_noise = reference.background_noise
    clean = {
        f"{r['model']}_{r['steps']}_step": {
            "background_noise": r["background_noise"],
            "goal": NOISE_GOAL * teacher_noise,
            "met": bool(r["background_noise"] <= NOISE_GOAL * teacher_noise),
        }
        for r in rows
        if r["model"] != "teacher"
    }
    grid_rows = [r for r in results if r.model != "teacher" or r.steps in (1, full_steps)]
    _grid(grid_rows, opts["grid_prompts"], workdir / "samples.png")
    plot_accuracy(rows, workdir / "accuracy.png")
    report = {
        "quick": quick,
        "teacher": {"path": str(teacher), "full_steps": full_steps, **meta.get("training", {})},
        "prompts": {"split": "eval", "count": len(prompts), "seed": seed},
        "grid_prompts": opts["grid_prompts"],
        "training": training,
        "results": rows,
        "targets": targets,
        "clean_samples": clean,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    table = _table(rows)
    (workdir / "report.md").write_text(_markdown(report, table))
    print(table)
    print(f"demo: {report['seconds']:.0f} s; report in {workdir / 'report.md'}")
    return report


def _markdown(report: dict, table: str) -> str:
    lines = [
        "# Toy distillation demo",
        "",
        f"Teacher: `{report['teacher']['path']}` ({report['teacher']['full_steps']} Euler steps "
        "at full quality). Accuracy (%) on "
        f"{report['prompts']['count']} held-out prompts of the shapes world, one image each, "
        "scored from the pixels by `distill_jax.evaluate`; `vs teacher` is overall accuracy "
        "relative to the teacher at its full step count.",
        "",
        table,
        "",
        "Training: "
        + "; ".join(
            f"{m}: {t['steps']} steps, batch {t['batch_size']}, {t['seconds']:.0f} s"
            for m, t in report["training"].items()
        ),
        "",
        "Targets: "
        + (
            "; ".join(
                f"{k} {_pct(v['relative_to_teacher'])}% of the teacher (goal "
                f"{100 * v['goal']:.0f}%: {'met' if v['met'] else 'not met'})"
                for k, v in report["targets"].items()
            )
            or "-"
        ),
        "",
        "Clean samples (`bg noise`: mean |pixel - 128| over background pixels, "
        f"`distill_jax.evaluate.background_noise`; goal: at most {NOISE_GOAL:g}x the teacher's): "
        + "; ".join(
            f"{k} {v['background_noise']:.1f} ({'met' if v['met'] else 'not met'})"
            for k, v in report["clean_samples"].items()
        ),
        "",
        "Accuracy against steps: `accuracy.png`.",
        "",
        f"Wall time: {report['seconds']:.0f} s. Samples: `samples.png` (rows: models; columns: "
        "the first prompts below).",
        "",
        *(
            f"{i + 1}. {s['prompt']}"
            for i, s in enumerate(report["results"][0]["samples"][: report["grid_prompts"]])
        ),
        "",
    ]
    return "\n".join(lines)


__all__ = ["METHODS", "NOISE_GOAL", "TARGETS", "measure_toy", "plot_accuracy", "run_demo"]
