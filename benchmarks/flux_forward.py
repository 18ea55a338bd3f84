"""Jitted JAX FLUX forward vs diffusers' eager PyTorch forward, float32, CPU.

Mid-size config: width 512 (8 heads x 64), 2 double + 4 single blocks, 1024 image + 128 text
tokens, batch 2. Prints median seconds per forward and the JAX/PyTorch ratio as a final JSON line.

    .venv/bin/python benchmarks/flux_forward.py [--repeats 10]
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import flux_inputs, median_seconds  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from flax import nnx  # noqa: E402

from distill_jax.models.flux import FluxConfig  # noqa: E402
from distill_jax.port.flux import flux_from_diffusers  # noqa: E402

CFG = FluxConfig.mid()
BATCH, GRID, TEXT = 2, (32, 32), 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        **{k: v for k, v in CFG.to_diffusers().items() if not k.startswith("_")}
    ).eval()
    model = flux_from_diffusers({k: v.numpy() for k, v in ref.state_dict().items()}, CFG)

    x = flux_inputs(CFG, BATCH, GRID, TEXT, np.random.default_rng(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, a: nnx.merge(graphdef, s)(**a))
    xj = jax.device_put(x)
    start = time.perf_counter()
    forward(state, xj).block_until_ready()
    compile_s = time.perf_counter() - start
    jax_s = median_seconds(lambda: forward(state, xj).block_until_ready(), args.repeats)

    xt = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.inference_mode():
        ref(**xt)  # warm-up
        torch_s = median_seconds(lambda: ref(**xt), args.repeats)
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
