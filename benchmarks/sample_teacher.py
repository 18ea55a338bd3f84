"""Teacher sampling: our jitted sampler + decoder against diffusers' FluxPipeline, float32, CPU.

Same random weights on both sides: a FLUX MMDiT of width 256 (4 heads x 64) with 2 double and
4 single blocks, a four-level VAE (factor 8, channels 32-64-128-128); 256x256 px (256 image
tokens), 64 text tokens, batch 2, 4 Euler steps at guidance 3.5. Text embeddings are given (the
encoders are not timed), so both sides time exactly the denoising loop and the decode. Prints
median seconds per batch for "latents" (the sampler alone) and "images" (sampler + VAE decode +
uint8), our compile time apart, the largest latent difference, and a final JSON line.

PyTorch is timed with 1 thread and with its default thread count, and the faster is the reference:
on a shared, oversubscribed CPU, OpenMP's spinning threads can make the default several times
slower than one thread, which would flatter JAX.

    .venv/bin/python benchmarks/sample_teacher.py [--steps 4] [--batch 2] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import median_seconds  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)

from distill_jax.models.autoencoder import AutoencoderConfig  # noqa: E402
from distill_jax.models.flux import FluxConfig  # noqa: E402
from distill_jax.pipeline import latents as lat  # noqa: E402
from distill_jax.pipeline.generate import denoise  # noqa: E402
from distill_jax.pipeline.pipeline import Pipeline  # noqa: E402
from distill_jax.port.autoencoder import autoencoder_from_diffusers  # noqa: E402
from distill_jax.port.flux import flux_from_diffusers  # noqa: E402

FLUX = FluxConfig.mid().replace(num_heads=4, context_dim=256, pooled_dim=128)  # width 256
VAE = dict(
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SCHEDULER = dict(  # FLUX.1-dev scheduler_config.json
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
TEXT, GUIDANCE = 64, 3.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="pixels, square")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        **{k: v for k, v in FLUX.to_diffusers().items() if not k.startswith("_")}
    ).eval()
    vae = AutoencoderKL(**VAE).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)

    def numpy_state(module):
        return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}

    # Only the transformer and the VAE are used: the text embeddings are inputs here.
    ours = Pipeline(
        transformer=flux_from_diffusers(numpy_state(transformer), FLUX),
        vae=autoencoder_from_diffusers(numpy_state(vae), AutoencoderConfig.from_diffusers(VAE)),
        clip=None,
        t5=None,
        clip_tokenizer=None,
        t5_tokenizer=None,
    )

    b, size = args.batch, args.size
    h, w = lat.latent_size(size, size)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((b, 16, h, w)).astype(np.float32)
    t5 = rng.standard_normal((b, TEXT, FLUX.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((b, FLUX.pooled_dim)).astype(np.float32)
    txt_ids, img_ids = np.zeros((TEXT, 3), np.float32), lat.image_ids(h, w)

    def ours_latents():
        return jax.block_until_ready(
            denoise(
                ours, lat.pack(noise), t5, pooled, txt_ids, img_ids,
                steps=args.steps, guidance=GUIDANCE,
            )
        )  # fmt: skip

    def ours_images():
        return ours.decode(ours_latents(), size, size)

    def theirs(output_type):
        with torch.inference_mode():
            return pipe(
                prompt_embeds=torch.from_numpy(t5),
                pooled_prompt_embeds=torch.from_numpy(pooled),
                latents=FluxPipeline._pack_latents(torch.from_numpy(noise), b, 16, h, w),
                height=size,
                width=size,
                num_inference_steps=args.steps,
                guidance_scale=GUIDANCE,
                output_type=output_type,
            ).images

    # Compile (first call) apart from steady state; decode compiles on the first ours_images().
    start = time.perf_counter()
    ours_latents()
    first_latents = time.perf_counter() - start
    start = time.perf_counter()
    ours_images()
    first_images = time.perf_counter() - start
    ours_lat_s = median_seconds(ours_latents, args.repeats)
    ours_img_s = median_seconds(ours_images, args.repeats)
    torch_times = {}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        theirs("latent")  # warm-up
        torch_times[threads] = (
            median_seconds(lambda: theirs("latent"), args.repeats),
            median_seconds(lambda: theirs("np"), args.repeats),
        )
    best_threads = min(torch_times, key=lambda t: torch_times[t][1])
    theirs_lat_s, theirs_img_s = torch_times[best_threads]
    torch.set_num_threads(best_threads)

    err = np.abs(np.asarray(ours_latents()) - theirs("latent").numpy()).max()
    pixel_err = np.abs(
        ours_images().astype(np.int32) - np.round(theirs("np") * 255).astype(np.int32)
    ).max()
    result = {
        "benchmark": "sample_teacher",
        "device": jax.devices()[0].device_kind,
        "torch_threads": best_threads,
        "torch_images_s_by_threads": {t: round(v[1], 4) for t, v in torch_times.items()},
        "batch": b,
        "pixels": size,
        "image_tokens": len(img_ids),
        "text_tokens": TEXT,
        "steps": args.steps,
        "jax_compile_sampler_s": round(first_latents - ours_lat_s, 3),
        "jax_compile_decode_s": round(first_images - ours_img_s, 3),
        "jax_latents_s": round(ours_lat_s, 4),
        "torch_latents_s": round(theirs_lat_s, 4),
        "jax_images_s": round(ours_img_s, 4),
        "torch_images_s": round(theirs_img_s, 4),
        "jax_images_per_s": round(b / ours_img_s, 3),
        "torch_images_per_s": round(b / theirs_img_s, 3),
        "speedup_latents": round(theirs_lat_s / ours_lat_s, 3),
        "speedup_images": round(theirs_img_s / ours_img_s, 3),
        "max_abs_latent_diff": float(err),
        "max_pixel_diff": int(pixel_err),
    }
    for k, v in result.items():
        print(f"{k:>24}: {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
