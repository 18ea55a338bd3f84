"""Checkpoint formats: recognising a source, inferring a FLUX structure from its tensors, and
opening its components' tensors lazily (diffusers folders, BFL single files, T2I-Distill .pt).

Used by :mod:`distill_jax.convert` and :mod:`distill_jax.folders`; nothing here writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from math import inf
from pathlib import Path
from typing import Any

from distill_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from distill_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from distill_jax.models.flux import DELTA_INITS, Flux, FluxConfig, check_time_scale
from distill_jax.models.t5 import T5Config, T5Encoder
from distill_jax.port import clip as clip_port
from distill_jax.port import t5 as t5_port
from distill_jax.port import torch_pt
from distill_jax.port.autoencoder import autoencoder_rules
from distill_jax.port.flux import bfl_rules, diffusers_rules
from distill_jax.port.safetensors_io import open_safetensors
from distill_jax.port.table import Rule

log = logging.getLogger(__name__)

MARKER = "distill_jax.json"  # marks a converted folder
COPIED = ("tokenizer", "tokenizer_2", "scheduler")  # copied verbatim from a pipeline folder
FORMATS = ("diffusers", "bfl", "t2i-distill")
_WEIGHTS = (
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
)


@dataclasses.dataclass(frozen=True)
class Component:
    """One pipeline part: its model and config classes, the PyTorch class it is read from, its key
    table, and a key normalisation applied to the source first (prefixes, tied keys)."""

    model: type
    config: type
    torch_class: str
    rules: Callable[[Any], list[Rule]]
    canonical: Callable[[Mapping, Any], Mapping] = lambda sd, cfg: sd

    def read_config(self, config: Mapping[str, Any]) -> Any:
        read = getattr(self.config, "from_diffusers", None) or self.config.from_transformers
        return read(config)


COMPONENTS = {
    "transformer": Component(Flux, FluxConfig, "FluxTransformer2DModel", diffusers_rules),
    "text_encoder": Component(
        CLIPTextEncoder,
        CLIPTextConfig,
        "CLIPTextModel",
        clip_port.clip_rules,
        clip_port.canonical_state_dict,
    ),
    "text_encoder_2": Component(
        T5Encoder,
        T5Config,
        "T5EncoderModel",
        t5_port.t5_rules,
        lambda sd, cfg: t5_port.alias_tied_embeddings(sd),
    ),
    "vae": Component(Autoencoder, AutoencoderConfig, "AutoencoderKL", autoencoder_rules),
}


# --- reading sources --------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; a one-line error naming the file otherwise."""
    try:
        out = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def _weights_file(folder: Path) -> Path | None:
    return next((folder / w for w in _WEIGHTS if (folder / w).is_file()), None)


def detect_format(src: str | Path) -> str:
    """``"diffusers"``, ``"bfl"`` or ``"t2i-distill"`` from the layout of ``src``."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_dir():
        if (src / MARKER).is_file() or (src / "params").is_dir():
            raise ValueError(f"{src} is already a distill-jax folder; load or export it instead")
        if (src / "model_index.json").is_file() or (
            (src / "config.json").is_file() and _weights_file(src)
        ):
            return "diffusers"
        found = sorted(p.name for p in src.iterdir())[:20]
        raise ValueError(
            f"unknown layout: {src} has neither model_index.json (a diffusers pipeline) nor "
            f"config.json with {' or '.join(_WEIGHTS)}; it holds {found}"
        )
    if src.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return "t2i-distill"
    if src.suffix == ".safetensors":
        return _naming(open_safetensors(src), src)
    raise ValueError(f"unknown layout: {src} is neither a folder, a .safetensors nor a .pt file")


# What a FLUX state dict's shapes reveal: field -> (diffusers config key, diffusers tensor, BFL
# tensor, axis). The MLP width and head dim are read from the first double block.
_REVEALS = {
    "hidden": ("num_attention_heads x attention_head_dim", "x_embedder.weight", "img_in.weight", 0),
    "in_channels": ("in_channels", "x_embedder.weight", "img_in.weight", 1),
    "out": ("out_channels", "proj_out.weight", "final_layer.linear.weight", 0),
    "context_dim": ("joint_attention_dim", "context_embedder.weight", "txt_in.weight", 1),
    "pooled_dim": (
        "pooled_projection_dim",
        "time_text_embed.text_embedder.linear_1.weight",
        "vector_in.in_layer.weight",
        1,
    ),
    "time_embed_dim": (
        "timestep embedding width",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "time_in.in_layer.weight",
        1,
    ),
    "head_dim": (
        "attention_head_dim",
        "transformer_blocks.0.attn.norm_q.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        0,
    ),
    "mlp_hidden": (
        "feed-forward width",
        "transformer_blocks.0.ff.net.0.proj.weight",
        "double_blocks.0.img_mlp.0.weight",
        0,
    ),
}
_BLOCKS = {
    "diffusers": ("transformer_blocks", "single_transformer_blocks"),
    "bfl": ("double_blocks", "single_blocks"),
}
_GUIDANCE = {
    "diffusers": "time_text_embed.guidance_embedder.linear_1.weight",
    "bfl": "guidance_in.in_layer.weight",
}
_HEADS = {
    "delta_embed": "timestep_embedder2.linear_1.weight",
    "logvar_head": "logvar_linear.weight",
}
# FluxConfig fields that diffusers' FluxTransformer2DModel fixes (MLP ratio 4, RoPE theta 10000,
# 256-wide sinusoids); export records them under ``_distill_jax``.
BEYOND_DIFFUSERS = ("mlp_ratio", "rope_theta", "time_embed_dim")
_NAMES = {
    "num_double": "num_layers",
    "num_single": "num_single_layers",
    "guidance_embed": "guidance_embeds",
    **{f: v[0] for f, v in _REVEALS.items()},
}


def _naming(tensors: Mapping, where: Path) -> str:
    if "x_embedder.weight" in tensors or "img_in.weight" in tensors:
        return "diffusers" if "x_embedder.weight" in tensors else "bfl"
    raise ValueError(
        f"unknown layout: {where} holds neither diffusers ('x_embedder.weight') nor BFL "
        f"('img_in.weight') FLUX transformer keys; its first keys are {sorted(tensors)[:5]}"
    )


def flux_config(
    tensors: Mapping,
    *,
    where: Path,
    time_scale: float,
    given: FluxConfig | None = None,
    given_from: str | Path = "",
) -> FluxConfig:
    """The :class:`FluxConfig` of a FLUX state dict from its key names and header shapes alone:
    ``given`` checked against them, or inferred (depth from the largest block index, widths from
    shapes, guidance and the students' extra heads from the presence of their keys). A config
    that does not match the weights is an error naming every field."""
    naming = _naming(tensors, where)
    col = 1 if naming == "diffusers" else 2
    seen, bad = {}, {}
    for field, reveal in _REVEALS.items():
        if (key := reveal[col]) in tensors:
            shape, rank = tuple(tensors.shape_of(key)), 1 if field == "head_dim" else 2
            if len(shape) == rank and 0 not in shape:
                seen[field] = shape[reveal[3]]
            else:
                at = f"{key!r} [{tensors.file_of(key)}]"
                bad[key] = f"{at} has shape {shape}, expected {rank} non-zero dimension(s)"
    if bad:
        raise ValueError(f"{where}: " + "; ".join(bad.values()))
    for field, prefix in zip(("num_double", "num_single"), _BLOCKS[naming], strict=True):
        found = (re.match(rf"{prefix}\.(\d+)\.", k) for k in tensors)
        seen[field] = 1 + max((int(m.group(1)) for m in found if m), default=-1)
    seen["guidance_embed"] = _GUIDANCE[naming] in tensors
    if given is None:
        lacking = [_REVEALS[f][col] for f in _REVEALS if f not in seen]
        if lacking or seen["head_dim"] != 128:
            raise ValueError(
                f"{where}: cannot infer the FLUX structure ("
                + (f"no {lacking}" if lacking else f"RoPE axes of head_dim {seen['head_dim']}")
                + "); pass a diffusers transformer config.json (--config)"
            )
        hidden, k = seen["hidden"], seen["head_dim"]
        given = FluxConfig(
            num_double=seen["num_double"],
            num_single=seen["num_single"],
            num_heads=hidden // k,
            head_dim=k,
            in_channels=seen["in_channels"],
            out_channels=None if seen["out"] == seen["in_channels"] else seen["out"],
            context_dim=seen["context_dim"],
            pooled_dim=seen["pooled_dim"],
            mlp_ratio=seen["mlp_hidden"] / hidden,
            guidance_embed=seen["guidance_embed"],
            time_embed_dim=seen["time_embed_dim"],
        )
        given_from = "the structure inferred"
    wrong = [
        f"{_NAMES[f]} is {getattr(given, f)} in {given_from} but {v} in the weights"
        for f, v in seen.items()
        if getattr(given, f) != v
    ]
    if wrong:
        raise ValueError(f"{given_from} does not match the weights in {where}: " + "; ".join(wrong))
    heads = {field: key in tensors for field, key in _HEADS.items()}
    return given.replace(time_scale=float(time_scale), **heads)


@dataclasses.dataclass
class Source:
    """One component to convert: its lazy tensors, config, key table and where they came from."""

    component: str
    tensors: Any  # a lazy reader: SafetensorsFile, ShardedSafetensors or TorchStateDict
    cfg: Any
    rules: list[Rule]
    where: Path  # the folder or file it came from
    files: list[Path]  # hashed into the converted config.json


def _time_scale(arg: float | None, fmt: str, cfg_json: Mapping, where: Path | None) -> float:
    if arg is not None:
        return check_time_scale(arg)
    if "_distill_jax" in cfg_json:  # written by our export
        extra = cfg_json["_distill_jax"]
        try:
            return check_time_scale(extra.get("time_scale") if isinstance(extra, dict) else None)
        except ValueError as err:
            raise ValueError(f"{where}: _distill_jax: {err}") from None
    return 1.0 if fmt == "t2i-distill" else 1000.0  # the paper's students are x1 models


def _folder_source(folder: Path, component: str | None, time_scale: float | None) -> Source:
    cfg_json = read_json(folder / "config.json")
    classes = {cfg_json.get("_class_name"), *(cfg_json.get("architectures") or [])}
    name = next((n for n, c in COMPONENTS.items() if c.torch_class in classes), None)
    if name is None or (component and name != component):
        want = [COMPONENTS[c].torch_class for c in ([component] if component else COMPONENTS)]
        raise ValueError(f"{folder / 'config.json'} describes {classes - {None}}, not {want}")
    weights = _weights_file(folder)
    if weights is None:
        found = sorted(p.name for p in folder.iterdir())
        raise ValueError(
            f"{folder}: no safetensors weights ({', '.join(_WEIGHTS)}); it holds "
            f"{found} (.bin pickles are not read)"
        )
    tensors = open_safetensors(weights)
    try:
        cfg = COMPONENTS[name].read_config(cfg_json)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{folder / 'config.json'}: {err}") from None
    if name == "transformer":
        scale = _time_scale(time_scale, "diffusers", cfg_json, folder / "config.json")
        extra = cfg_json.get("_distill_jax", {})
        delta_init = extra.get("delta_init", cfg.delta_init) if isinstance(extra, dict) else None
        if delta_init not in DELTA_INITS:
            raise ValueError(f"{folder / 'config.json'}: _distill_jax: delta_init={delta_init!r}")
        kept = {}  # the structure diffusers' config cannot say (our export writes it here)
        for field in BEYOND_DIFFUSERS:
            value = extra.get(field, getattr(cfg, field))
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < inf:
                raise ValueError(f"{folder / 'config.json'}: _distill_jax: {field}={value!r}")
            kept[field] = type(getattr(cfg, field))(value)
        cfg = flux_config(
            tensors,
            where=folder,
            time_scale=scale,
            given=cfg.replace(delta_init=delta_init, **kept),
            given_from=folder / "config.json",
        )
    files = [folder / "config.json", *tensors.files]
    return Source(name, tensors, cfg, COMPONENTS[name].rules(cfg), folder, files)


def source_files(folder: Path, components: Sequence[str] | None = None) -> list[str]:
    """Glob patterns, relative to a diffusers ``folder`` of which only the JSON files are on disk
    yet (a Hub snapshot being fetched), of the other files :func:`open_sources` will read: each
    wanted component's weights (the shards its index names, else the single-file names) and the
    folders a pipeline's conversion copies."""

    def weights(sub: str) -> list[str]:
        prefix = f"{sub}/" if sub else ""
        for name in _WEIGHTS[:2]:  # the indexes
            if (folder / prefix / name).is_file():
                shards = read_json(folder / prefix / name).get("weight_map")
                shards = shards.values() if isinstance(shards, dict) else ()
                return [prefix + name, *sorted({prefix + f for f in shards if isinstance(f, str)})]
        return [prefix + name for name in _WEIGHTS[2:]]

    if not (folder / "model_index.json").is_file():
        return ["config.json", *weights("")]
    index = read_json(folder / "model_index.json")
    present = [c for c in COMPONENTS if isinstance(index.get(c), list) and index[c][-1]]
    wanted = [c for c in components or present if c in present]
    files = [f for c in wanted for f in (f"{c}/config.json", *weights(c))]
    return files + [f"{d}/*" for d in COPIED]


def open_sources(
    src: Path,
    fmt: str,
    components: Sequence[str] | None,
    config: Path | None,
    time_scale: float | None,
) -> tuple[list[Source], list[Path]]:
    """The components to convert, and the folders to copy along."""
    if src.is_dir() and fmt != "diffusers":
        raise ValueError(f"--format {fmt} reads a single file; {src} is a folder")
    if src.is_dir():
        if config is not None:
            raise ValueError("--config is for single files; a folder's own config.json is used")
        if not (src / "model_index.json").is_file():
            source = _folder_source(src, None, time_scale)
            if components and list(components) != [source.component]:
                raise ValueError(f"{src} holds only the {source.component}, not {components}")
            return [source], []
        index = read_json(src / "model_index.json")
        present = [c for c in COMPONENTS if isinstance(index.get(c), list) and index[c][-1]]
        missing = [c for c in components or () if c not in present]
        if missing:
            raise ValueError(f"{src / 'model_index.json'} lists no {missing} (it has {present})")
        sources = [_folder_source(src / c, c, time_scale) for c in components or present]
        return sources, [src / d for d in COPIED if (src / d).is_dir()]
    if components and list(components) != ["transformer"]:
        raise ValueError(f"{src} is a single transformer file; it has no {components}")
    tensors = torch_pt.load_pt(src) if fmt == "t2i-distill" else open_safetensors(src)
    naming = _naming(tensors, src)
    if fmt != "t2i-distill" and naming != fmt:
        raise ValueError(f"--format {fmt}, but {src} holds {naming}-named keys")
    cfg_json = read_json(config) if config else {}
    cfg = flux_config(
        tensors,
        where=src,
        time_scale=_time_scale(time_scale, fmt, cfg_json, config),
        given=FluxConfig.from_diffusers(cfg_json) if config else None,
        given_from=config or "",
    )
    rules = bfl_rules(cfg) if naming == "bfl" else diffusers_rules(cfg)
    files = [src] + ([config] if config else [])
    return [Source("transformer", tensors, cfg, rules, src, files)], []
