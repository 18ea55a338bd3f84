"""Text to image: prompts -> ``pipeline.encode`` -> sampler -> ``pipeline.decode`` -> uint8 pixels.

The pipeline is FLUX's (:class:`~distill_jax.pipeline.pipeline.Pipeline`: T5 and CLIP, the VAE)
or the toy's (:class:`~distill_jax.pipeline.toy.ToyPipeline`: a tiny text encoder, pixels as
latents); the samplers see only the transformer and the packed latents.

Three samplers over the same FLUX MMDiT (spec sections 5.2-5.4):

- ``"teacher"``: FLUX's flow-matching Euler ODE on the resolution-shifted schedule
  (:func:`~distill_jax.pipeline.samplers.flux_sigmas`), guidance as an embedding, no true CFG.
  This is diffusers' ``FluxPipeline`` step for step.
- ``"scm"``: the multistep consistency sampler in TrigFlow time; the flow-velocity network is
  turned into a TrigFlow one by :func:`~distill_jax.parameterization.trigflow_velocity`.
- ``"meanflow"``: average-velocity jumps ``z_r = z_t - (t - r) u(z_t, t, t - r)`` on the same
  shifted schedule; the model gets ``timestep2 = t - r``.

Times go to the model as flow times in [0, 1]; the model multiplies them by its own
``cfg.time_scale`` (1000 for stock FLUX, 1 for the distilled students).

Shapes: B batch, C latent channels, h/w latent size, L = (h/2)(w/2) image tokens, S text tokens,
H/W pixels. Each whole sampling loop is one ``jax.jit`` (a ``lax.scan`` over the schedule),
compiled once per shape; so is FLUX's decoder.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from distill_jax import distributed
from distill_jax.parameterization import trigflow_velocity
from distill_jax.pipeline import latents as lat
from distill_jax.pipeline.pipeline import Pipeline
from distill_jax.pipeline.samplers import (
    euler_sample,
    flux_shift_mu,
    flux_sigmas,
    meanflow_sample,
    meanflow_sigmas,
    scm_sample,
    scm_timesteps,
)
from distill_jax.pipeline.toy import ToyPipeline

log = logging.getLogger(__name__)
# What generate serves: both have encode(prompts, max_sequence_length), decode(packed, H, W),
# check(), latent_channels and vae_scale_factor.
AnyPipeline = Pipeline | ToyPipeline

METHODS = ("teacher", "scm", "meanflow")
# Bounds that refuse, before anything is loaded or compiled, requests that could only fail later
# (XLA aborting the process, or hours of work for an out-of-memory error):
MAX_SIDE = 4096  # pixels: 65536 image tokens, 4x FLUX.1's largest trained size (2 MP)
MAX_STEPS = 1000  # model evaluations; the teacher samples with 28-50
MAX_SEQUENCE_LENGTH = 512  # T5 tokens: what FLUX.1 was trained with, diffusers' own limit
SEED_LIMIT = 2**32  # seeds are JAX's 32-bit PRNG seeds; larger ones would alias smaller ones


def check_request(
    prompts: Sequence[str],
    *,
    height: int = 512,
    width: int = 512,
    steps: int = 1,
    guidance: float | None = None,
    seed: int = 0,
    max_sequence_length: int = 1,
) -> None:
    """Refuses, naming the argument, a sampling request that cannot give a correct image (the
    model-dependent checks follow in :func:`generate`); an argument left out is not checked."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes of a command line arrive as surrogates
            raise ValueError(f"prompt {i} ({prompt!r}) is not valid UTF-8 text") from None
    limits = dict(
        height=(height, 16, MAX_SIDE),
        width=(width, 16, MAX_SIDE),
        steps=(steps, 1, MAX_STEPS),
        seed=(seed, 0, SEED_LIMIT - 1),
        max_sequence_length=(max_sequence_length, 1, MAX_SEQUENCE_LENGTH),
    )
    for name, (value, low, high) in limits.items():
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be an integer")
        if not low <= value <= high:
            raise ValueError(f"{name}={value} must be in [{low}, {high}]")
    lat.latent_size(height, width)  # multiples of 16
    if guidance is not None and not np.isfinite(guidance):
        raise ValueError(f"guidance={guidance} must be a finite number (or None)")


def default_schedule(method: str, steps: int, image_seq_len: int) -> np.ndarray:
    """The schedule ``[steps + 1]`` float32 ending at 0 that ``method`` samples on.

    Flow times ``flux_sigmas(steps, L)`` for ``"teacher"`` and ``"meanflow"`` (the FLUX.1
    scheduler config, shift from ``L`` image tokens); TrigFlow times ``scm_timesteps(steps)`` for
    ``"scm"`` (``[pi/2, 1.3, 0]`` at two steps, as the paper's test script).
    """
    _check_method(method)
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if method == "teacher":
        return flux_sigmas(steps, image_seq_len)
    if method == "meanflow":
        return meanflow_sigmas(steps, flux_shift_mu(image_seq_len))
    return scm_timesteps(steps)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")


def _check_model(pipeline: AnyPipeline, method: str, guidance: float | None) -> None:
    """Clear errors before tracing for a model/method/guidance combination that cannot run."""
    _check_method(method)
    model = pipeline.transformer
    if model.guidance_in is None and guidance is not None:
        raise ValueError(
            f"guidance={guidance} but the transformer has no guidance embedder "
            "(guidance_embed=False, e.g. FLUX.1-schnell); pass guidance=None"
        )
    if model.guidance_in is not None and guidance is None:
        raise ValueError("the transformer embeds guidance; pass a guidance value (e.g. 3.5)")
    if method == "meanflow" and model.delta_in is None:
        raise ValueError(
            "method='meanflow' needs a MeanFlow student (delta_embed=True: the t - r embedder); "
            "this transformer has none"
        )
    if method != "meanflow" and model.delta_in is not None:
        raise ValueError(
            f"method={method!r} but the transformer is a MeanFlow student (delta_embed=True); "
            "use method='meanflow'"
        )


@functools.partial(jax.jit, static_argnums=0, static_argnames=("method",))
def _denoise(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    noise: jax.Array,  # [B, L, 4C] standard normal
    t5: jax.Array,  # [B, S, D_t5]
    pooled: jax.Array,  # [B, D_clip]
    txt_ids: jax.Array,  # [S, 3]
    img_ids: jax.Array,  # [L, 3]
    schedule: jax.Array,  # [N + 1]
    guidance: jax.Array | None,  # [B]
    key: jax.Array,
    *,
    method: str,
) -> jax.Array:
    model = nnx.merge(graphdef, state)

    def flow(z, s, delta=None):  # velocity at flow time s (MeanFlow: average over [s - delta, s])
        return model(z, t5, pooled, s, img_ids, txt_ids, guidance, delta)

    if method == "teacher":
        return euler_sample(flow, noise, schedule)
    if method == "meanflow":
        return meanflow_sample(flow, noise, schedule)
    return scm_sample(lambda x, t: trigflow_velocity(flow, x, t), noise, key, schedule)


def denoise(
    pipeline: AnyPipeline,
    noise: jax.Array | np.ndarray,
    t5: jax.Array,
    pooled: jax.Array,
    txt_ids: jax.Array,
    img_ids: jax.Array | np.ndarray,
    *,
    method: str = "teacher",
    steps: int = 28,
    schedule: np.ndarray | None = None,
    guidance: float | None = 3.5,
    key: jax.Array | None = None,
) -> jax.Array:
    """Runs one sampler from packed noise to packed clean latents.

    Args:
      noise: standard normal packed latents ``[B, L, 4C]`` (sCM scales it by sigma_d itself).
      t5, pooled, txt_ids: from ``pipeline.encode``.
      img_ids: ``[L, 3]`` from :func:`~distill_jax.pipeline.latents.image_ids`.
      method: ``"teacher"``, ``"scm"`` or ``"meanflow"``.
      steps: number of model calls; ignored when ``schedule`` is given.
      schedule: ``[N + 1]`` decreasing times ending at 0 (flow times for teacher and MeanFlow,
        TrigFlow times for sCM); default :func:`default_schedule`.
      guidance: the embedded guidance value, ``None`` for models without a guidance embedder.
      key: PRNG key of sCM's fresh per-step noise (default ``PRNGKey(0)``); unused otherwise.
    Returns:
      Final latents ``[B, L, 4C]`` float32 in diffusion units ((VAE - shift) * scale), packed.
    """
    _check_model(pipeline, method, guidance)
    if schedule is None:
        schedule = default_schedule(method, steps, noise.shape[1])
    schedule = np.asarray(schedule, np.float32)
    if schedule.ndim != 1 or len(schedule) < 2 or schedule[-1] != 0:
        raise ValueError(f"schedule must be [N + 1] times ending at 0, got {schedule}")
    args = _denoise_args(pipeline, noise, t5, pooled, txt_ids, img_ids, schedule, guidance, key)
    return _denoise(*args, method=method)


def _denoise_args(pipeline, noise, t5, pooled, txt_ids, img_ids, schedule, guidance, key):
    b = noise.shape[0]
    g = None if guidance is None else jnp.full((b,), guidance, jnp.float32)
    key = jax.random.PRNGKey(0) if key is None else key
    graphdef, state = nnx.split(pipeline.transformer)
    return (
        graphdef,
        state,
        jnp.asarray(noise, jnp.float32),
        t5,
        pooled,
        jnp.asarray(txt_ids, jnp.float32),
        jnp.asarray(img_ids, jnp.float32),
        jnp.asarray(schedule, jnp.float32),
        g,
        key,
    )


def _batches(n: int, batch_size: int | None) -> tuple[int, list[slice]]:
    bs = n if batch_size is None else batch_size
    if bs < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    bs = min(bs, n)
    return bs, [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def _pad(x: np.ndarray | list, size: int):
    """Pads the batch axis to ``size`` by repeating the last row, so every batch has one shape."""
    if isinstance(x, list):
        return x + [x[-1]] * (size - len(x))
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


def initial_noise(
    pipeline: AnyPipeline, n: int, height: int, width: int, seed: int, init_noise=None
) -> np.ndarray:
    """``[n, C, h, w]`` float32 noise: ``jax.random.normal(PRNGKey(seed), ...)``, or
    ``init_noise`` checked against that shape."""
    shape = lat.noise_shape(
        n, pipeline.latent_channels, height, width, vae_scale_factor=pipeline.vae_scale_factor
    )
    if init_noise is None:
        return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32))
    if tuple(init_noise.shape) != shape:
        raise ValueError(
            f"init_noise has shape {tuple(init_noise.shape)}; {n} prompt(s) at {height}x{width} "
            f"px need [N, C, h, w] = {list(shape)}"
        )
    if not jnp.issubdtype(init_noise.dtype, jnp.floating):  # ints, bools, complex: not noise
        raise ValueError(f"init_noise is {init_noise.dtype}; expected standard normal floats")
    noise = np.asarray(init_noise, np.float32)
    finite = np.isfinite(noise)
    if not finite.all():
        bad = noise.size - int(np.count_nonzero(finite))
        raise ValueError(f"init_noise has {bad} non-finite value(s) of {noise.size}")
    return noise


def generate(
    pipeline: AnyPipeline,
    prompts: str | Sequence[str],
    *,
    height: int = 512,
    width: int = 512,
    steps: int = 28,
    guidance: float | None = 3.5,
    seed: int = 0,
    init_noise: np.ndarray | jax.Array | None = None,
    method: str = "teacher",
    max_sequence_length: int = 256,
    batch_size: int | None = None,
    timings: list[float] | None = None,
) -> np.ndarray:
    """Images for ``N`` prompts: uint8 ``[N, height, width, 3]``, from a
    :class:`~distill_jax.pipeline.pipeline.Pipeline` or a
    :class:`~distill_jax.pipeline.toy.ToyPipeline` alike.

    Args:
      prompts: one prompt or ``N`` prompts (one image each).
      height, width: pixels, multiples of 16 (``2 x`` the VAE's scale factor).
      steps: model evaluations (28 for the teacher, 1-4 for the students).
      guidance: the embedded guidance value; ``None`` for models without guidance embedding.
      seed: the initial noise is ``jax.random.normal(PRNGKey(seed), [N, C, h, w])`` unless
        ``init_noise`` is given; sCM's per-step noise comes from ``fold_in(PRNGKey(seed), 1)``
        folded with the batch index, so it depends on ``batch_size``.
      init_noise: ``[N, C, h, w]`` float32 standard normal noise in the unpacked VAE-latent
        layout, as diffusers draws it.
      method: ``"teacher"``, ``"scm"`` or ``"meanflow"`` (see the module docstring).
      max_sequence_length: T5 tokens ``S`` (the toy's text length is its world's).
      batch_size: prompts per sampler call (default all); the last batch is padded so that every
        call has one shape and compiles once.
      timings: if given, receives each batch's wall seconds of sampling and decoding (the
        sampler is compiled beforehand; the first batch includes the decoder's compilation).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("generate: no prompts given")
    check_request(
        prompts,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        seed=seed,
        max_sequence_length=max_sequence_length,
    )
    pipeline.check()
    _check_model(pipeline, method, guidance)
    n, c = len(prompts), pipeline.latent_channels
    bs, batches = _batches(n, batch_size)
    init_noise = initial_noise(pipeline, n, height, width, seed, init_noise)
    shape = init_noise.shape
    _, _, h, w = shape
    key = jax.random.PRNGKey(seed)
    noise = np.asarray(lat.pack(init_noise))  # [N, L, 4C]
    img_ids = lat.image_ids(h, w)
    schedule = default_schedule(method, steps, len(img_ids))
    log.info(
        "generate: %d prompt(s) in %d batch(es) of %d, %dx%d px, latent %s -> %d tokens x %d "
        "channels, text %d tokens, method=%s, %d step(s), guidance=%s, schedule=%s",
        n,
        len(batches),
        bs,
        height,
        width,
        list(shape[1:]),
        len(img_ids),
        4 * c,
        max_sequence_length,
        method,
        len(schedule) - 1,
        guidance,
        np.round(schedule, 4).tolist(),
    )
    step_key = jax.random.fold_in(key, 1)
    images = []
    for i, sl in enumerate(tqdm(batches, desc="generate", unit="batch", disable=len(batches) < 2)):
        t5, pooled, txt_ids = pipeline.encode(_pad(prompts[sl], bs), max_sequence_length)
        args = _denoise_args(
            pipeline,
            _pad(noise[sl], bs),
            t5,
            pooled,
            txt_ids,
            img_ids,
            schedule,
            guidance,
            jax.random.fold_in(step_key, i),
        )
        if i == 0:  # compile ahead of time so that compilation is timed apart from sampling
            start = time.perf_counter()
            _denoise.lower(*args, method=method).compile()
            log.info("generate: sampler compiled in %.1f s", time.perf_counter() - start)
        start = time.perf_counter()
        packed = jax.block_until_ready(_denoise(*args, method=method))
        if i == 0:
            log.info("generate: sampling %d image(s) took %.2f s", bs, time.perf_counter() - start)
        images.append(pipeline.decode(packed, height, width)[: sl.stop - sl.start])
        if timings is not None:
            timings.append(time.perf_counter() - start)
    return np.concatenate(images)


def generate_to_folder(
    pipeline: AnyPipeline,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    init_noise: np.ndarray | None = None,
    grid: bool = True,
    **kw,
) -> list[Path]:
    """:func:`generate` into ``out_dir/<i:05d>.png`` (prompt ``i``), shared by every process of a
    multi-host job: process ``p`` generates and writes prompts ``p, p + P, ...`` on its own
    devices, each from the initial noise a single process would give it, so no image is made
    twice and the files do not depend on the number of hosts (sCM's per-step noise, drawn per
    batch, excepted). Process 0 also writes ``grid.png`` of all of them (every process must call
    this). ``kw`` go to :func:`generate`. Returns the paths this process wrote.
    """
    from distill_jax.pipeline.images import image_grid, save_images

    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate: no prompts given")
    checked = ("steps", "guidance", "max_sequence_length")
    request = {k: kw[k] for k in checked if k in kw}
    check_request(prompts, height=height, width=width, seed=seed, **request)
    n = len(prompts)
    init_noise = initial_noise(pipeline, n, height, width, seed, init_noise)  # all n prompts
    mine = distributed.my_share(n)
    images = np.zeros((0, height, width, 3), np.uint8)
    paths: list[Path] = []
    if mine:
        subset = [prompts[i] for i in mine]
        images = generate(
            pipeline,
            subset,
            height=height,
            width=width,
            seed=seed,
            init_noise=init_noise[mine],
            **kw,
        )
        paths = save_images(images, out_dir, subset, grid=False, indices=mine)
    if grid and n > 1:
        index, count = distributed.process()
        per = -(-n // count)
        padded = np.zeros((per, height, width, 3), np.uint8)
        padded[: len(images)] = images
        if count > 1:
            from jax.experimental import multihost_utils

            gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, per, ...]
        else:
            gathered = padded[None]
        if index == 0:
            ordered = np.stack([gathered[i % count, i // count] for i in range(n)])
            path = Path(out_dir) / "grid.png"
            from PIL import Image

            Image.fromarray(image_grid(ordered)).save(path)
            paths.append(path)
    return paths


__all__ = [
    "METHODS",
    "AnyPipeline",
    "check_request",
    "default_schedule",
    "denoise",
    "generate",
    "generate_to_folder",
    "initial_noise",
]
