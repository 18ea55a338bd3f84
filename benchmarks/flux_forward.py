"""Jitted JAX FLUX forward vs diffusers' eager PyTorch forward, float32, CPU.

Mid-size config: width 512 (8 heads x 64), 2 double + 4 single blocks, 1024 image + 128 text
tokens, batch 2. Prints median seconds per forward and the JAX/PyTorch ratio as a final JSON line.

    .venv/bin/python benchmarks/flux_forward.py [--repeats 10]
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill_jax.models.flux import FluxConfig  # noqa: E402
from distill_jax.port.flux import flux_from_diffusers  # noqa: E402

CFG = FluxConfig.mid()
BATCH, GRID, TEXT = 2, (32, 32), 128


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        **{k: v for k, v in CFG.to_diffusers().items() if not k.startswith("_")}
    ).eval()
    model = flux_from_diffusers({k: v.numpy() for k, v in ref.state_dict().items()}, CFG)

    rng = np.random.default_rng(0)
    h, w = GRID
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None]
    x = dict(
        hidden_states=rng.standard_normal((BATCH, h * w, CFG.in_channels), np.float32),
        encoder_hidden_states=rng.standard_normal((BATCH, TEXT, CFG.context_dim), np.float32),
        pooled_projections=rng.standard_normal((BATCH, CFG.pooled_dim), np.float32),
        timestep=np.full((BATCH,), 0.5, np.float32),
        img_ids=ids.reshape(-1, 3),
        txt_ids=np.zeros((TEXT, 3), np.float32),
        guidance=np.full((BATCH,), 3.5, np.float32),
    )
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, a: nnx.merge(graphdef, s)(**a))
    xj = jax.device_put(x)
    start = time.perf_counter()
    forward(state, xj).block_until_ready()
    compile_s = time.perf_counter() - start
    jax_s = timed(lambda: forward(state, xj).block_until_ready(), args.repeats)

    xt = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.inference_mode():
        ref(**xt)  # warm-up
        torch_s = timed(lambda: ref(**xt), args.repeats)
        err = np.abs(np.asarray(forward(state, xj)) - ref(**xt).sample.numpy()).max()

    print(
        json.dumps(
            {
                "benchmark": "flux_forward",
                "device": jax.devices()[0].device_kind,
                "config": "width 512 (8x64), 2+4 blocks, 1024+128 tokens, batch 2, float32",
                "jax_median_s": round(jax_s, 4),
                "torch_median_s": round(torch_s, 4),
                "ratio_jax_over_torch": round(jax_s / torch_s, 3),
                "jax_compile_s": round(compile_s, 2),
                "max_abs_diff": float(err),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
