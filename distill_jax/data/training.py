"""The trainer's input: ``config.data`` as per-host batches, and their placement on the mesh.

Batches are ``{"latents": [B, C, h, w] (standard units), "t5": [B, S, Dt], "pooled": [B, P]}``
float32, ``aux`` the unconditional embeddings ``{"uncond_t5": [S, Dt], "uncond_pooled": [P]}``.
Each host reads only the rows of every global batch that its devices hold (:func:`host_rows`);
:func:`batch_placer` assembles them into global arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from distill_jax.data import input_pipeline, shapes
from distill_jax.data.synthetic import SyntheticLatents
from distill_jax.models.flux import FluxConfig
from distill_jax.models.t5 import T5Encoder
from distill_jax.pipeline import toy


def host_rows(sharding: NamedSharding, global_batch: int) -> np.ndarray:
    """The rows of a ``[global_batch, ...]`` array that this host's devices hold under
    ``sharding``: what this host reads of each global batch (sorted)."""
    index = sharding.addressable_devices_indices_map((global_batch,))
    return np.asarray(
        sorted({r for idx in index.values() for r in range(*idx[0].indices(global_batch))})
    )


def make_input(
    config: ml_collections.ConfigDict, student_cfg: FluxConfig, rows: np.ndarray | None = None
) -> tuple[Any, dict[str, np.ndarray]]:
    """A grain iterator of this host's ``rows`` of every global batch (default: all rows; see
    :func:`distill_jax.data.input_pipeline.global_batches`) with ``get_state``/``set_state``, and
    ``aux``. The sequence of global batches does not depend on the number of processes."""
    dc = config.data
    if dc.kind == "synthetic":
        source = SyntheticLatents(
            channels=dc.latent_channels,
            grid=tuple(dc.latent_grid),
            text_len=dc.text_len,
            context_dim=student_cfg.context_dim,
            pooled_dim=student_cfg.pooled_dim,
            seed=dc.shuffle_seed,
            size=dc.synthetic_size,
        )
        aux = {
            "uncond_t5": np.zeros((dc.text_len, student_cfg.context_dim), np.float32),
            "uncond_pooled": np.zeros((student_cfg.pooled_dim,), np.float32),
        }
        batches = input_pipeline.global_batches(
            source, global_batch=dc.batch_size, rows=rows, seed=dc.shuffle_seed
        )
        return iter(batches), aux
    if dc.kind == "latents":
        return _prepared_latents(dc, rows)
    if dc.kind == "shapes":
        world = shapes_world(config)
        return _shapes(dc, shapes_text_encoder(config), world, rows)
    raise ValueError(f"config.data.kind={dc.kind!r}: 'synthetic', 'latents' or 'shapes'")


# --- the shapes world -------------------------------------------------------------------------


def shapes_text_encoder(config: ml_collections.ConfigDict) -> T5Encoder:
    """The frozen text encoder that captions the shapes input (float32): the toy teacher's
    (``config.teacher.path``, a toy pipeline folder), or for a teacher trained from scratch one
    with fixed random weights drawn from ``config.seed`` (``config.data.text_layers`` T5 layers)."""
    if not config.teacher.path:
        return toy.new_text_encoder(len(shapes.VOCAB), config.seed, config.data.text_layers)
    from distill_jax.folders import load_model, toy_world

    world = toy_world(config.teacher.path)  # the world is checked here
    if world["vocab"] != shapes.VOCAB or world["text_len"] != shapes.TEXT_LEN:
        raise ValueError(
            f"config.teacher.path={config.teacher.path!r} reads another shapes world (its "
            "vocabulary or caption length differ from distill_jax.data.shapes')"
        )
    # The text encoder alone: the teacher's transformer is loaded onto the mesh by the trainer.
    return load_model(config.teacher.path, component="text_encoder_2", dtype="float32")


# Renders of the training split the autoencoder of a teacher from scratch is fitted on.
AUTOENCODER_FIT_RECORDS = 4096


def shapes_world(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """How the shapes input reads the world (:func:`distill_jax.folders.toy_world`'s dict): the
    toy teacher's (``config.teacher.path``), or for a teacher trained from scratch the
    vocabulary, ``config.data.text_context`` and an autoencoder fitted to the first renders of
    the training split (``config.data.ae_kind``, ``ae_channels`` per ``ae_patch``-pixel patch;
    ``ae_channels = 3 ae_patch^2`` of kind linear is the pixels themselves)."""
    if config.teacher.path:
        from distill_jax.folders import toy_world

        return toy_world(config.teacher.path)
    dc = config.data
    world = {"vocab": shapes.VOCAB, "text_len": shapes.TEXT_LEN, "text_context": dc.text_context}
    if dc.ae_kind == "linear" and dc.ae_channels == 3 * dc.ae_patch**2:
        return {**world, "autoencoder": toy.Autoencoder.pixels(dc.ae_patch)}
    if dc.ae_kind not in toy.AUTOENCODERS:
        raise ValueError(f"config.data.ae_kind={dc.ae_kind!r}: one of {list(toy.AUTOENCODERS)}")
    source = shapes.ShapesSource("train", seed=0)
    images = np.stack([source[i]["image"] for i in range(AUTOENCODER_FIT_RECORDS)])
    ae = toy.AUTOENCODERS[dc.ae_kind].fit(images, dc.ae_channels, dc.ae_patch)
    return {**world, "autoencoder": ae}


def toy_pipeline(transformer: Any, text_encoder: T5Encoder, world: dict) -> toy.ToyPipeline:
    """The toy pipeline of the shapes world with these networks, reading ``world``
    (:func:`shapes_world`)."""
    return toy.ToyPipeline(transformer, text_encoder, **world)


class _Captioned:
    """A shapes record -> the trainer's layout; a fraction of captions become "" (dropout)."""

    def __init__(self, table, t5, pooled, dropout: float, autoencoder):
        self.table, self.t5, self.pooled, self.dropout = table, t5, pooled, dropout
        self.autoencoder = autoencoder

    def __call__(self, row: dict) -> dict:
        drop = np.random.default_rng([7, row["index"]]).random() < self.dropout
        j = self.table["" if drop else row["caption"]]
        return {
            "latents": self.autoencoder.encode(row["image"][None])[0],
            "t5": self.t5[j],
            "pooled": self.pooled[j],
        }


def _shapes(dc, text_encoder: T5Encoder, world: dict, rows):
    """The training split of the shapes world rendered on the fly (record ``i`` of
    ``ShapesSource("train", seed=dc.shuffle_seed)``) as latents of the world's autoencoder,
    captions through ``text_encoder`` as the world reads them, ``dc.caption_dropout`` of them
    dropped to "". Every training prompt's embeddings are computed once."""
    texts = [""] + [p.text for p in shapes.split_prompts("train")]
    t5, pooled = toy.encode_text(
        text_encoder, texts, shapes.VOCAB, shapes.TEXT_LEN, context=world["text_context"]
    )
    autoencoder = world["autoencoder"]
    t5, pooled = np.asarray(t5, np.float32), np.asarray(pooled, np.float32)
    table = {t: i for i, t in enumerate(texts)}
    captioned = _Captioned(table, t5, pooled, dc.caption_dropout, autoencoder)
    batches = input_pipeline.global_batches(
        shapes.ShapesSource("train", seed=dc.shuffle_seed),
        global_batch=dc.batch_size,
        rows=rows,
        seed=dc.shuffle_seed,
        record_fn=captioned,
    )
    return iter(batches), {"uncond_t5": t5[0], "uncond_pooled": pooled[0]}


def _prepared_latents(dc, rows):
    """Batches of a ``distill-jax prepare`` dataset in the trainer's layout: standard-unit
    latents ``(z - shift) * scale`` as ``[B, C, h, w]``, float32 embeddings."""
    from distill_jax.data import builders
    from distill_jax.data.prepare import UNCOND_FILE

    if not dc.path:
        raise ValueError("config.data.kind='latents' needs config.data.path (a prepare output)")
    meta = builders.load_info(dc.path).metadata
    scale, shift = float(meta["scaling_factor"]), float(meta["shift_factor"])
    uncond_path = Path(dc.path) / UNCOND_FILE
    if not uncond_path.is_file():
        raise FileNotFoundError(
            f"{uncond_path} is missing: re-run `distill-jax prepare` on "
            "this dataset (it writes the unconditional embeddings)"
        )
    with np.load(uncond_path) as f:
        aux = {"uncond_t5": f["t5"], "uncond_pooled": f["pooled"]}

    def to_trainer(b):
        z = (np.asarray(b["latents"], np.float32) - shift) * scale  # [B, h, w, C]
        return {
            "latents": np.ascontiguousarray(z.transpose(0, 3, 1, 2)),
            "t5": np.asarray(b["t5"], np.float32),
            "pooled": np.asarray(b["pooled"], np.float32),
        }

    ds = input_pipeline.latent_batches(
        dc.path, global_batch=dc.batch_size, rows=rows, seed=dc.shuffle_seed
    )
    return iter(ds.map(to_trainer)), aux


def batch_placer(sharding: NamedSharding, rows: np.ndarray, size: int) -> Callable:
    """``place(batch) -> global arrays under sharding``, for batches holding this host's ``rows``
    of a global batch of ``size``."""
    position = np.full(size, -1)
    position[rows] = np.arange(len(rows))

    def put(v):
        v = np.asarray(v)
        if len(v) != len(rows):
            raise ValueError(
                f"the input gave {len(v)} rows; this host holds {len(rows)} of the global batch"
            )
        return jax.make_array_from_callback(
            (size, *v.shape[1:]), sharding, lambda idx: v[position[idx[0]]]
        )

    return lambda batch: {k: put(v) for k, v in batch.items()}
