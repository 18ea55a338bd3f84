"""The ``distill-jax`` command: one verb per library function.

    distill-jax convert SRC DST [--format auto|diffusers|bfl|t2i-distill] [--dtype ...] ...
    distill-jax export SRC DST --format diffusers|t2i-distill
    distill-jax sample CKPT --prompt "a red cube" [--prompt ...] --out DIR [--method scm ...]

Each verb registers its flags, and its ``run`` logs the process, the devices and the arguments and
calls one library function; everything a verb does is that function in a notebook. Adding a verb is
a local change: write ``_add_<verb>(subparsers)`` and list it in :data:`VERBS`. jax and the models
are imported inside the verbs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("distill_jax.cli")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def _size(text: str) -> int:
    """``"10GB"`` -> 10**10 bytes (diffusers' ``max_shard_size`` spelling; GiB, MiB also work)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 10GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _components(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _guidance(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _log_context(args: argparse.Namespace) -> None:
    import jax

    kinds = sorted({d.device_kind for d in jax.devices()})
    log.info(
        "distill-jax %s: process %d of %d, %d device(s) (%d local): %s",
        args.verb,
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
        ", ".join(kinds),
    )
    log.info("arguments: %s", {k: v for k, v in vars(args).items() if k not in ("run", "verb")})


# --- convert ----------------------------------------------------------------------------------


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="FLUX weights (diffusers, BFL, T2I-Distill) -> a distill-jax folder",
        description="Converts a diffusers pipeline or component folder, a BFL single file or a "
        "T2I-Distill .pt into a distill-jax folder: one Orbax checkpoint and config.json per "
        "component, plus the tokenizer and scheduler folders. Streams tensor by tensor; writes "
        "to a temporary folder beside DST and renames it at the end.",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="folder with model_index.json or config.json, .safetensors or .pt",
    )
    p.add_argument("dst", metavar="DST", help="the distill-jax folder to write")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "diffusers", "bfl", "t2i-distill"),
        help="source layout (default: auto, from the files)",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="stored parameter dtype (default: lossless, i.e. bfloat16 for bfloat16 "
        "sources and float32 otherwise)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        choices=(1000.0, 1.0),
        default=None,
        metavar="{1000,1}",
        help="the transformer's time multiplier (default: 1000 for diffusers and BFL "
        "weights, 1 for T2I-Distill students)",
    )
    p.add_argument(
        "--components",
        type=_components,
        default=None,
        metavar="transformer,text_encoder,text_encoder_2,vae",
        help="comma-separated subset to convert (default: every one the source has)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="a diffusers transformer config.json for a single file (default: "
        "structure inferred from tensor names and shapes)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from distill_jax.convert import convert

    convert(
        args.src,
        args.dst,
        format=args.format,
        dtype=args.dtype,
        time_scale=args.time_scale,
        components=args.components,
        config=args.config,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


# --- export -----------------------------------------------------------------------------------


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="a converted transformer -> diffusers safetensors or a T2I-Distill .pt",
        description="Writes the transformer of a distill-jax folder for PyTorch: a diffusers "
        "folder (safetensors shards, their index and config.json) that "
        "FluxTransformer2DModel.from_pretrained loads, or a .pt holding {'module': state_dict} "
        "as the T2I-Distill code saves students. Extra heads keep the paper's names "
        "(timestep_embedder2.*, logvar_linear.*).",
    )
    p.add_argument("src", metavar="SRC", help="a distill-jax folder, or its transformer folder")
    p.add_argument(
        "dst", metavar="DST", help="the folder (diffusers) or .pt file (t2i-distill) to write"
    )
    p.add_argument("--format", required=True, choices=("diffusers", "t2i-distill"))
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="written dtype (default: as stored)",
    )
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default="10GB",
        help="largest diffusers shard, e.g. 5GB or 2GiB (default: 10GB)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from distill_jax.convert import export

    export(
        args.src,
        args.dst,
        format=args.format,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


# --- sample -----------------------------------------------------------------------------------


def _add_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="prompts -> PNG images from a converted pipeline",
        description="Generates one image per prompt with a converted pipeline (distill-jax "
        "convert of a diffusers FLUX pipeline, possibly with a distilled transformer) and writes "
        "00000.png, 00001.png, ... (prompt in the PNG text) and grid.png to --out.",
    )
    p.add_argument("ckpt", metavar="CKPT", help="a converted distill-jax pipeline folder")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        dest="prompts",
        help="a prompt; repeat the flag for several images",
    )
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument(
        "--method",
        choices=("teacher", "scm", "meanflow"),
        default="teacher",
        help="sampler: FLUX's Euler ODE, sCM multistep or MeanFlow (default: teacher)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=28,
        help="model evaluations (default: 28; distilled students use 1-4)",
    )
    p.add_argument(
        "--guidance",
        type=_guidance,
        default=3.5,
        help="embedded guidance, or 'none' for models without it (default: 3.5)",
    )
    p.add_argument(
        "--height", type=int, default=512, help="pixels, a multiple of 16 (default: 512)"
    )
    p.add_argument("--width", type=int, default=512, help="pixels, a multiple of 16 (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed (default: 0)")
    p.add_argument(
        "--init-noise",
        default=None,
        metavar="PATH.npy",
        help="[N, C, h, w] float32 noise instead of the seed's (e.g. from diffusers)",
    )
    p.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (default: 256)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="parameter dtype to load (default: as stored)",
    )
    p.set_defaults(run=_run_sample)


def _run_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from distill_jax.convert import load_pipeline
    from distill_jax.pipeline.generate import generate
    from distill_jax.pipeline.images import save_images

    noise = None if args.init_noise is None else np.load(args.init_noise)
    pipeline = load_pipeline(args.ckpt, dtype=args.dtype)
    images = generate(
        pipeline,
        args.prompts,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        init_noise=noise,
        method=args.method,
        max_sequence_length=args.max_sequence_length,
    )
    paths = save_images(images, args.out, args.prompts, grid=True)
    log.info("wrote %d file(s) to %s", len(paths), args.out)


VERBS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_convert,
    _add_export,
    _add_sample,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-jax",
        description="FLUX.1 in JAX and its few-step distillation (sCM, MeanFlow).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one verb; returns the exit status (1 with a one-line message for bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax reports every read at INFO
    _log_context(args)
    try:
        args.run(args)
    except (ValueError, OSError, ImportError) as err:  # bad input: the message says what
        print(f"distill-jax {args.verb}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
