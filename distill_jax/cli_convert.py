"""The ``convert`` and ``export`` verbs of the ``distill-jax`` command (:mod:`distill_jax.cli`):
checkpoints in from FLUX's world (paths or Hub ids) and students out to PyTorch.
"""

from __future__ import annotations

import argparse
import re

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


# --- convert ----------------------------------------------------------------------------------


def add_convert(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="FLUX weights (diffusers, BFL, T2I-Distill) -> a distill-jax folder",
        description="Converts a diffusers pipeline or component folder, a BFL single file or a "
        "T2I-Distill .pt into a distill-jax folder: one Orbax checkpoint and config.json per "
        "component, plus the tokenizer and scheduler folders. SRC is a path or a Hugging Face Hub "
        "id, org/name[@revision][/folder or file]: only the files the components need are "
        "fetched, into the Hub cache (HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE apply; gated "
        "models need `hf auth login` or HF_TOKEN). Streams tensor by tensor; writes to a "
        "temporary folder beside DST and renames it at the end.",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="folder with model_index.json or config.json, .safetensors or .pt; or a Hub id "
        "(a path that exists wins)",
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
    p.add_argument("--revision", default=None, help="of a Hub id: a branch, tag or commit")
    p.add_argument(
        "--subfolder", default=None, help="of a Hub id: a folder (or file) inside the repository"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert NaN or Inf weights, with a warning counting them (default: refuse them)",
    )
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
        allow_nonfinite=args.allow_nonfinite,
        revision=args.revision,
        subfolder=args.subfolder,
    )


# --- export -----------------------------------------------------------------------------------


def add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="a converted transformer -> diffusers safetensors or a T2I-Distill .pt",
        description="Writes the transformer of a distill-jax folder for PyTorch: a diffusers "
        "folder (safetensors shards, their index, config.json and a model card README.md) that "
        "FluxTransformer2DModel.from_pretrained loads and distill_jax.torch_students samples, or "
        "a .pt holding {'module': state_dict} as the T2I-Distill code saves students. Extra "
        "heads keep the paper's names (timestep_embedder2.*, logvar_linear.*).",
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
