"""Latency of 1-step and 4-step generation by a FLUX.1-lite-sized student at 512 px (issue 17).

Random weights, built on the device (nothing is downloaded): the transformer of ``--preset``
(default ``flux1_lite_8b``: width 3072, 8 + 38 blocks, 8.2B parameters) and the FLUX VAE
(``AutoencoderConfig.flux()``), both with bfloat16 parameters and compute (``--dtype``). Times
the library's own path, :func:`distill_jax.pipeline.generate.denoise` (``--method``: the sCM or
MeanFlow sampler; one jitted program per step count) then ``Pipeline.decode`` to uint8 images,
for a batch of ``--batch`` prompts whose text embeddings are given (T5 and CLIP are not timed:
they run once per prompt whatever the step count). Prints the median seconds of the sampler
alone and of sampler + decode per step count, compile apart, as a final JSON line.

    .venv/bin/python benchmarks/generate_latency.py [--preset flux1_lite_8b] [--size 512]
    .venv/bin/python benchmarks/generate_latency.py --preset tiny --vae tiny --size 64  # CPU try
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import median_seconds  # noqa: E402
from flax import nnx

from distill_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.pipeline import latents as lat
from distill_jax.pipeline.generate import denoise
from distill_jax.pipeline.pipeline import Pipeline

TEXT, GUIDANCE = 256, 3.5  # the paper's 512 px setting (configs/scm.py: 256 T5 tokens)


def built(make, dtype):
    """A module born on the device with ``dtype`` parameters (never a float32 copy on the host)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(jnp.float32)))
    state = jax.jit(lambda: nnx.state(make(dtype)))()
    return nnx.merge(graphdef, jax.tree.map(lambda a, s: s, abstract, state))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="flux1_lite_8b", choices=FluxConfig.PRESETS)
    parser.add_argument("--vae", default="flux", choices=("flux", "tiny"))
    parser.add_argument("--method", default="scm", choices=("scm", "meanflow"))
    parser.add_argument("--size", type=int, default=512, help="pixels, square")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=(1, 4))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    heads = {"logvar_head": True} if args.method == "scm" else {"delta_embed": True}
    cfg = FluxConfig.preset(args.preset, time_scale=1.0, **heads)
    # The VAE's latent is the transformer's (FLUX's 16 channels; tiny presets' 4).
    vae_cfg = dataclasses.replace(
        getattr(AutoencoderConfig, args.vae)(), latent_channels=cfg.in_channels // 4
    )

    start = time.perf_counter()
    # Parameters and compute in `dtype` (one module, not float32 masters as in training).
    transformer = built(
        lambda d: Flux(cfg, rngs=nnx.Rngs(0), dtype=d, param_dtype=d, attn_impl="auto"), dtype
    )
    vae = built(lambda d: Autoencoder(vae_cfg, rngs=nnx.Rngs(1), dtype=d, param_dtype=d), dtype)
    pipe = Pipeline(transformer, vae, clip=None, t5=None, clip_tokenizer=None, t5_tokenizer=None)
    build_s = time.perf_counter() - start
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(transformer, nnx.Param)))

    b = args.batch
    h, w = lat.latent_size(args.size, args.size, vae_scale_factor=pipe.vae_scale_factor)
    rng = np.random.default_rng(0)
    noise = lat.pack(rng.standard_normal((b, vae_cfg.latent_channels, h, w)).astype(np.float32))
    t5 = jnp.asarray(rng.standard_normal((b, TEXT, cfg.context_dim)), dtype)
    pooled = jnp.asarray(rng.standard_normal((b, cfg.pooled_dim)), dtype)
    txt_ids, img_ids = np.zeros((TEXT, 3), np.float32), lat.image_ids(h, w)
    guidance = GUIDANCE if cfg.guidance_embed else None

    results = {}
    for steps in args.steps:

        def latents(steps=steps):
            return jax.block_until_ready(
                denoise(
                    pipe, noise, t5, pooled, txt_ids, img_ids,
                    method=args.method, steps=steps, guidance=guidance,
                )
            )  # fmt: skip

        def images(steps=steps):
            return pipe.decode(latents(steps), args.size, args.size)

        start = time.perf_counter()
        images()  # compiles the sampler at this step count (and the decoder once)
        compile_s = time.perf_counter() - start
        results[f"{steps}_step"] = {
            "latents_median_s": round(median_seconds(latents, args.repeats, f"{steps} step"), 4),
            "images_median_s": round(median_seconds(images, args.repeats, f"{steps} + vae"), 4),
            "first_call_s": round(compile_s, 1),
        }
    print(
        json.dumps(
            {
                "benchmark": "generate_latency",
                "device": jax.devices()[0].device_kind,
                "config": (
                    f"{args.preset} {args.method} student ({n_params / 1e6:,.1f}M parameters), "
                    f"{args.vae} VAE, {args.size}x{args.size} px, batch {b}, {TEXT} text "
                    f"tokens, {args.dtype}"
                ),
                "build_s": round(build_s, 1),
                "repeats": args.repeats,
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
