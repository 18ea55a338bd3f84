"""The toy text-to-image pipeline of the shapes world: a tiny FLUX MMDiT and a frozen text encoder.

The pieces mirror FLUX's, shrunk until a laptop CPU trains and distils them in minutes:

- **Latents** are the pixels themselves, 4x4 space-to-depth: a 32x32 RGB image in [-1, 1] is
  ``[48, 8, 8]`` (channels ``(c, dy, dx)``), which FLUX's 2x2 packing turns into 16 tokens of
  192 channels (each object of the shapes world covers 2x2 of them). The "autoencoder" is exact
  and free.
- **Text** is the word-level vocabulary of the captions through a tiny T5 encoder with fixed
  random weights plus absolute sinusoidal positions (FLUX's text position ids are all zero, so
  the encoder must carry word order: "a red circle left of a blue square" differs from its
  mirror only in order). The pooled vector (CLIP's role) is the mean over the caption's tokens.
- **The transformer** is :class:`~distill_jax.models.flux.Flux` with a tiny :class:`FluxConfig`,
  ``time_scale=1`` and no guidance embedding, trained by the project's own trainer with flow
  matching (:func:`train_teacher`); sCM and MeanFlow distil it unchanged.

Sampling goes through :func:`distill_jax.pipeline.generate.denoise`, the samplers of the real
pipeline. A trained teacher ships in ``distill_jax/assets/toy_teacher`` (:func:`load_toy`)::

    python -m distill_jax.toy train-teacher --workdir /tmp/toy_teacher   # reproduces it
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import einops
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from distill_jax.config import base_config
from distill_jax.data import shapes
from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.models.t5 import T5Config, T5Encoder
from distill_jax.pipeline import latents as lat

log = logging.getLogger(__name__)

TEACHER_PATH = Path(__file__).parent / "assets" / "toy_teacher"
META_FILE = "toy.json"
COMPONENTS = ["transformer", "text_encoder_2"]
PATCH = 4  # pixels per side folded into channels by space-to-depth
LATENT_CHANNELS = 3 * PATCH * PATCH
TEACHER_STEPS = 16  # the teacher's full number of Euler steps


def text_config() -> T5Config:
    """The frozen toy text encoder: 2 T5 layers of width 64 over the caption vocabulary."""
    return T5Config(
        vocab_size=len(shapes.VOCAB), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4
    )


def flux_config() -> FluxConfig:
    """The toy teacher: 1 double + 2 single blocks of width 384 (6 heads of 64; 8.3M parameters).

    The width is well above a token's 192 channels: the velocity carries the noise through the
    residual stream. ``time_scale=1`` as the paper's rescaled teacher (spec 2.2), so that sCM and
    MeanFlow distil it directly."""
    return FluxConfig(
        num_double=1,
        num_single=2,
        num_heads=6,
        head_dim=64,
        in_channels=4 * LATENT_CHANNELS,
        context_dim=text_config().d_model,
        pooled_dim=text_config().d_model,
        axes_dim=(8, 28, 28),
        mlp_ratio=2.0,
        guidance_embed=False,
        time_scale=1.0,
    )


# --- text -----------------------------------------------------------------------------------


def tokenize(prompts: Sequence[str], length: int = shapes.TEXT_LEN) -> np.ndarray:
    """Word ids ``[B, length]`` int32, padded with 0; an unknown word is an error naming it."""
    index = {w: i for i, w in enumerate(shapes.VOCAB)}
    out = np.zeros((len(prompts), length), np.int32)
    for b, prompt in enumerate(prompts):
        words = prompt.lower().split()
        if len(words) > length:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; the toy takes {length}")
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ValueError(
                f"prompt {prompt!r}: unknown word(s) {unknown}; the shapes world knows "
                f"{list(shapes.VOCAB[1:])}"
            )
        out[b, : len(words)] = [index[w] for w in words]
    return out


def _sinusoid(length: int, dim: int) -> np.ndarray:
    """Transformer absolute positions ``[S, D]``: sin on even, cos on odd features."""
    pos = np.arange(length)[:, None]
    freq = np.exp(-math.log(10000.0) * np.arange(0, dim, 2) / dim)[None]
    out = np.zeros((length, dim), np.float32)
    out[:, 0::2], out[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
    return out


class ToyTextEncoder(nnx.Module):
    """Word ids ``[B, S]`` -> ``(hidden [B, S, D], pooled [B, D])``: a T5 encoder whose token
    embeddings get absolute positions added; pooled is the mean over non-padding tokens (zeros
    for the empty caption)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.t5 = T5Encoder(cfg, rngs=rngs)

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        t5 = self.t5
        x = t5.embed(ids) + _sinusoid(ids.shape[1], t5.cfg.d_model)  # [B, S, D]
        bias = t5.position_bias(ids.shape[1])
        for layer in t5.layers:
            x = layer(x, bias, None)
        x = t5.final_norm(x)
        mask = (ids > 0).astype(x.dtype)[..., None]  # [B, S, 1]
        pooled = (x * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        return x, pooled


@jax.jit
def _encode(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


# --- the pipeline ---------------------------------------------------------------------------


def to_latents(images: np.ndarray) -> np.ndarray:
    """uint8 images ``[B, H, W, 3]`` -> latents ``[B, 48, H/4, W/4]`` float32: pixels in
    [-1, 1] folded 4x4 into channels."""
    x = shapes.to_model(np.asarray(images))
    return einops.rearrange(x, "b (h dy) (w dx) c -> b (c dy dx) h w", dy=PATCH, dx=PATCH)


def from_latents(latents: np.ndarray) -> np.ndarray:
    """Latents ``[B, 48, h, w]`` -> uint8 images ``[B, 4h, 4w, 3]`` (clipped)."""
    x = einops.rearrange(
        np.asarray(latents, np.float32), "b (c dy dx) h w -> b (h dy) (w dx) c", dy=PATCH, dx=PATCH
    )
    return shapes.from_model(x)


@dataclasses.dataclass
class ToyPipeline:
    """The toy's transformer and text encoder. ``transformer`` is any :class:`Flux` over the toy
    latents: the teacher, or an sCM or MeanFlow student."""

    transformer: Flux
    text: ToyTextEncoder

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """``(t5 [B, S, D], pooled [B, D])`` of the prompts ("" is the unconditional one)."""
        return _encode(*nnx.split(self.text), jnp.asarray(tokenize(prompts)))

    def with_transformer(self, transformer: Flux) -> ToyPipeline:
        return dataclasses.replace(self, transformer=transformer)


def new_pipeline(seed: int = 0) -> ToyPipeline:
    """A fresh pipeline: random transformer, and the text encoder's fixed random weights."""
    rngs = nnx.Rngs(seed)
    return ToyPipeline(Flux(flux_config(), rngs=rngs), ToyTextEncoder(text_config(), rngs=rngs))


def sample(
    pipeline: ToyPipeline,
    prompts: Sequence[str],
    *,
    method: str = "teacher",
    steps: int = TEACHER_STEPS,
    seed: int = 0,
    batch_size: int = 64,
    timings: list[float] | None = None,
) -> np.ndarray:
    """uint8 images ``[N, 32, 32, 3]``, one per prompt, with the real pipeline's samplers.

    ``method`` is ``"teacher"`` (Euler on FLUX's shifted schedule), ``"scm"`` or ``"meanflow"``
    (see :func:`distill_jax.pipeline.generate.default_schedule`). Image ``i``'s noise is drawn
    from ``(seed, i)``, so the same prompt list and seed give the same noise for every method.
    Prompts go ``batch_size`` at a time (the last batch padded: one compilation); ``timings``,
    if given, receives each batch's wall seconds (the first includes compilation).
    """
    from distill_jax.pipeline.generate import denoise

    n = len(prompts)
    if n == 0:
        raise ValueError("sample: no prompts given")
    h = w = shapes.SIZE // PATCH
    ids = lat.image_ids(h, w)
    txt_ids = np.zeros((shapes.TEXT_LEN, 3), np.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
    noise = jax.vmap(lambda k: jax.random.normal(k, (LATENT_CHANNELS, h, w)))(keys)
    noise = np.asarray(lat.pack(noise))  # [N, L, 4 * LATENT_CHANNELS]
    bs = min(batch_size, n)
    out = []
    for start in range(0, n, bs):
        chunk = list(prompts[start : start + bs])
        pad = bs - len(chunk)  # one shape for every call: one compilation
        t5, pooled = pipeline.encode(chunk + [chunk[-1]] * pad)
        z = np.concatenate([noise[start : start + bs], np.repeat(noise[-1:], pad, 0)])
        start_time = time.perf_counter()
        packed = denoise(
            pipeline,
            z,
            t5,
            pooled,
            txt_ids,
            ids,
            method=method,
            steps=steps,
            guidance=None,
            key=jax.random.fold_in(jax.random.key(seed), 1 + start),
        )
        out.append(from_latents(lat.unpack(np.asarray(packed), h, w))[: len(chunk)])
        if timings is not None:
            timings.append(time.perf_counter() - start_time)
    return np.concatenate(out)


# --- saving and loading ---------------------------------------------------------------------


def save_toy(
    pipeline: ToyPipeline, dst: str | Path, meta: dict | None = None, *, dtype: str | None = None
) -> Path:
    """Writes ``dst/transformer`` and ``dst/text_encoder_2`` as converted components, with the
    converted-folder marker (so ``load_flux(dst)`` and ``config.teacher.path=dst`` work), and
    ``dst/toy.json`` (the world it was made for, and ``meta``). ``dtype`` (e.g. ``"bfloat16"``,
    half the size) stores the parameters in another dtype; loading casts them back to float32."""
    from distill_jax.convert import MARKER, save_model

    dst = Path(dst).absolute()  # Orbax refuses relative paths
    dst.mkdir(parents=True, exist_ok=True)
    parts = {"transformer": pipeline.transformer, "text_encoder_2": pipeline.text.t5}
    for name, model in parts.items():
        save_model(model, dst / name, overwrite=True, dtype=dtype)
    index = {"format": "distill-jax", "version": 1, "components": COMPONENTS, "copied": []}
    (dst / MARKER).write_text(json.dumps({**index, "source": {"format": "toy"}}, indent=2) + "\n")
    world = {"size": shapes.SIZE, "patch": PATCH, "vocab": list(shapes.VOCAB)}
    (dst / META_FILE).write_text(json.dumps({"world": world, **(meta or {})}, indent=1) + "\n")
    return dst


def load_toy(path: str | Path = TEACHER_PATH) -> ToyPipeline:
    """A saved toy pipeline (default: the shipped teacher), float32 on the default device."""
    from distill_jax.convert import load_model

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} holds no {META_FILE}: not a toy pipeline folder")
    world = json.loads(meta_path.read_text())["world"]
    here = {"size": shapes.SIZE, "patch": PATCH}
    if world["vocab"] != list(shapes.VOCAB) or any(world.get(k) != v for k, v in here.items()):
        raise ValueError(
            f"{meta_path}: made for another shapes world (vocabulary, size or patch differ "
            f"from {here})"
        )
    text = nnx.eval_shape(lambda: ToyTextEncoder(text_config(), rngs=nnx.Rngs(0)))
    text.t5 = load_model(path / "text_encoder_2", dtype="float32")
    return ToyPipeline(load_model(path / "transformer", dtype="float32"), text)


def is_toy(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


# --- training data --------------------------------------------------------------------------


class _Embedded(grain.transforms.Map):
    """A shapes record -> the trainer's layout; a fraction of captions become "" (dropout)."""

    def __init__(self, table: dict[str, int], t5: np.ndarray, pooled: np.ndarray, dropout: float):
        self.table, self.t5, self.pooled, self.dropout = table, t5, pooled, dropout

    def map(self, row: dict) -> dict:
        drop = np.random.default_rng([7, row["index"]]).random() < self.dropout
        j = self.table["" if drop else row["caption"]]
        return {
            "latents": to_latents(row["image"][None])[0],
            "t5": self.t5[j],
            "pooled": self.pooled[j],
        }


def shapes_input(
    pipeline: ToyPipeline,
    *,
    batch_size: int,
    seed: int = 0,
    caption_dropout: float = 0.1,
) -> tuple[Any, dict[str, np.ndarray]]:
    """``(iterator, aux)`` for :func:`distill_jax.train.train` over the training split.

    Batches are ``{"latents": [B, 48, 8, 8], "t5": [B, S, D], "pooled": [B, D]}`` float32 with
    this host's share ``B`` of ``batch_size``; the iterator has grain's ``get_state`` /
    ``set_state``. Text embeddings are computed once for every training prompt.
    """
    texts = [""] + [p.text for p in shapes.split_prompts("train")]
    t5, pooled = pipeline.encode(texts)
    t5, pooled = np.asarray(t5, np.float32), np.asarray(pooled, np.float32)
    table = {t: i for i, t in enumerate(texts)}
    per_host = batch_size // jax.process_count()
    source = shapes.ShapesSource("train", seed=seed)
    ds = (
        grain.MapDataset.source(source)[jax.process_index() :: jax.process_count()]
        .shuffle(seed=seed)
        .repeat()
        .map(_Embedded(table, t5, pooled, caption_dropout))
        .batch(per_host, drop_remainder=True)
    )
    aux = {"uncond_t5": t5[0], "uncond_pooled": pooled[0]}
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))), aux


# --- configs --------------------------------------------------------------------------------


def toy_config(method: str = "flow_matching") -> ml_collections.ConfigDict:
    """Trainer config of the toy: the teacher (``"flow_matching"``) or a student (``"scm"``,
    ``"meanflow"``). ``configs/toy_teacher.py`` and ``configs/toy_distill.py`` return these."""
    c = base_config()
    c.method = method
    c.model.preset = "tiny"  # unused: the teacher is passed in, or built from overrides below
    c.model.overrides = dataclasses.asdict(flux_config())
    c.model.dtype, c.model.remat = "float32", "none"
    c.log_every, c.async_checkpoints = 50, False
    c.loss.guidance_values = (0.0,)  # no guidance embedder: unused
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.optim.clip = 1.0
    if method == "flow_matching":
        c.total_steps, c.checkpoint_every = 6000, 500
        c.data.batch_size = 64
        c.loss.fm_time_mean = 1.0  # logit-normal(1, 1): median flow time 0.73
        c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 6e-4, 200, "cosine"
        c.optim.ema_decay = 0.999
        c.optim.weight_decay = 0.0
    elif method == "scm":
        c.total_steps, c.checkpoint_every = 800, 400
        c.data.batch_size = 32
        c.optim.lr, c.optim.weight_decay = 2e-4, 0.0
        c.loss.tangent_warmup_steps = 100
    elif method == "meanflow":
        c.total_steps, c.checkpoint_every = 800, 400
        c.data.batch_size = 32
        c.optim.lr, c.optim.weight_decay = 2e-4, 0.0
        c.loss.use_cfg = False
        c.model.delta_init = "zero"
    else:
        raise ValueError(f"toy_config: method={method!r}; flow_matching, scm or meanflow")
    return c


def train_teacher(
    workdir: str | Path,
    out: str | Path | None = None,
    *,
    config: ml_collections.ConfigDict | None = None,
    seed: int = 0,
) -> ToyPipeline:
    """Trains the toy teacher from scratch with flow matching (``toy_config()`` by default) and,
    with ``out``, saves its EMA parameters in bfloat16 as a toy pipeline folder. Resumes from
    ``workdir``'s checkpoints."""
    from distill_jax.train import train

    config = config or toy_config("flow_matching")
    pipeline = new_pipeline(seed)
    data = shapes_input(pipeline, batch_size=config.data.batch_size, seed=config.data.shuffle_seed)
    start = time.perf_counter()
    run = train(config, workdir, data=data)
    params = run.state["ema"] if run.state.get("ema") is not None else run.state["params"]
    teacher = pipeline.with_transformer(nnx.merge(run.graphdef, jax.device_get(params)))
    wall = time.perf_counter() - start
    log.info("toy teacher: %d steps in %.0f s", config.total_steps, wall)
    if out is not None:
        save_toy(
            teacher,
            out,
            {
                "training": {
                    "command": "python -m distill_jax.toy train-teacher --workdir WORKDIR",
                    "steps": config.total_steps,
                    "wall_seconds": round(wall, 1),
                    "final_loss": run.metrics[-1]["train/loss"] if run.metrics else None,
                },
                "teacher_steps": TEACHER_STEPS,
            },
            dtype="bfloat16",  # half the size; the demo's accuracies are unchanged (+-0.4%)
        )
    return teacher


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill_jax.toy")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("train-teacher", help="train the toy teacher with flow matching")
    p.add_argument("--workdir", required=True, help="checkpoints (resumes from them)")
    p.add_argument("--out", default=str(TEACHER_PATH), help="where to save the teacher")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: config)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = toy_config("flow_matching")
    if args.steps:
        config.total_steps = args.steps
    train_teacher(args.workdir, args.out, config=config)


if __name__ == "__main__":
    main()
