"""Checkpoints in and out: ``convert`` FLUX-world weights into distill-jax folders and
``export`` students back to PyTorch. Loading and saving the folders is :mod:`distill_jax.folders`.

Sources (:func:`detect_format`), each a local path or a Hub id ``org/name[@revision][/path]``
(:mod:`distill_jax.hub`: only the files the wanted components need are fetched into the Hub
cache):

- ``diffusers``: a pipeline folder (``model_index.json``: FLUX.1-dev, Freepik/flux.1-lite-8B), one
  component folder (``config.json`` and ``*.safetensors``, sharded with an index or not), or one
  ``.safetensors`` file holding a transformer in diffusers naming;
- ``bfl``: a BFL single file (``flux1-dev.safetensors`` naming);
- ``t2i-distill``: a ``.pt`` holding ``{"module": state_dict}`` in diffusers naming, with the
  students' extra heads ``timestep_embedder2.*`` (MeanFlow) and ``logvar_linear.*`` (sCM).

Each component becomes a folder in :mod:`distill_jax.folders`' layout. Conversion streams:
tensors are read one at a time, mapped by the component's key table (``port.table.to_target``
with ``on_leaf``) and written :data:`BATCH_BYTES` at a time with Orbax's partial save, so memory
holds two batches and a tensor, never a copy of the model. Everything is written to a temporary
path beside DST (``folders.staging``), renamed at the end, and removed on any failure. NaN and
Inf weights are refused unless ``allow_nonfinite``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx, traverse_util
from tqdm.auto import tqdm

from distill_jax import card, hub
from distill_jax.folders import (
    DTYPES,
    component_folder,
    component_meta,
    config_from_json,
    load_params,
    parse_dtype,
    staging,
    stored_dtype,
    write_json,
)
from distill_jax.models.flux import Flux, FluxConfig, check_time_scale
from distill_jax.port import checksum, torch_pt
from distill_jax.port.flux import diffusers_rules
from distill_jax.port.formats import (
    BEYOND_DIFFUSERS,
    COMPONENTS,
    FORMATS,
    MARKER,
    Source,
    detect_format,
    open_sources,
    source_files,
)
from distill_jax.port.params import param_shapes
from distill_jax.port.safetensors_io import write_sharded
from distill_jax.port.table import PortError, Rule, to_source, to_target

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("diffusers", "t2i-distill")
BATCH_BYTES = 512 << 20  # leaves per Orbax partial save; at most two batches are in memory
SHARD_BYTES = 10 << 30  # diffusers' default max_shard_size


class _Tracked(Mapping):
    """The source as the key table reads it: counts reads for the progress bar and, once
    ``strict``, refuses tensors that are not floating point (the table's inputs are weights)."""

    def __init__(self, source: Any, what: str):
        self.source, self.what, self.strict, self.bytes, self.count = source, what, False, 0, 0

    def __getitem__(self, key: str) -> np.ndarray:
        array = self.source[key]
        if self.strict and not jnp.issubdtype(array.dtype, jnp.floating):
            where = f"{key!r} [{self.source.file_of(key)}]"
            raise PortError(self.what, [f"source tensor {where} is {array.dtype}, not a float"])
        self.bytes, self.count = self.bytes + array.nbytes, self.count + 1
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def __contains__(self, key: object) -> bool:
        return key in self.source

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.source.shape_of(key)


class _LeafWriter:
    """Converted leaves -> an Orbax checkpoint, ``batch_bytes`` at a time (Orbax's partial save);
    one batch is written in the background while the next one is converted."""

    def __init__(self, path: Path, shapes: Mapping[str, tuple], dtype: np.dtype, batch_bytes: int):
        # Orbax takes absolute paths only; users give relative ones.
        self.path = Path(path).absolute()
        self.shapes, self.dtype, self.batch_bytes = shapes, dtype, batch_bytes
        self.written: set[str] = set()
        self.checksums: dict[str, str] = {}
        self.batch: dict[str, np.ndarray] = {}
        self.pending = None
        self.context = ocp.Context()
        self.context.memory.deepcopy_host_arrays = False  # the leaves are never touched again

    def __call__(self, name: str, array: np.ndarray) -> None:
        if name in self.written or (array.shape, array.dtype) != (self.shapes[name], self.dtype):
            got = f"{name!r} {array.dtype}{list(array.shape)}"
            raise PortError(f"writing {self.path}", [f"leaf {got} twice, or not {self.dtype}"])
        self.written.add(name)
        self.checksums[name] = checksum.host_checksum(array)
        self.batch[name] = array
        if sum(a.nbytes for a in self.batch.values()) >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        self.wait()
        if self.batch:
            with self.context:
                self.pending = ocp.partial.save_async(
                    self.path, traverse_util.unflatten_dict(self.batch, sep=".")
                )
        self.batch = {}

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _LeafWriter:
        return self

    def __exit__(self, error: type | None, *_: Any) -> None:
        if error is not None:  # let the batch in flight land before the caller removes the folder
            with contextlib.suppress(Exception):
                self.wait()
            return
        self._flush()
        self.wait()
        missing = sorted(set(self.shapes) - self.written)
        if missing:
            raise PortError(f"writing {self.path}", [f"leaf {m!r} never written" for m in missing])
        ocp.partial.finalize(self.path)


def _sha256(path: Path, stop: threading.Event) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while (chunk := f.read(16 << 20)) and not stop.is_set():
            digest.update(chunk)  # releases the GIL: hashing overlaps the conversion
    return digest.hexdigest()


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress)


def _nonfinite(array: np.ndarray) -> int:
    """How many NaNs and infinities ``array`` holds (0 for integers)."""
    if not jnp.issubdtype(array.dtype, jnp.floating):
        return 0
    return array.size - int(np.count_nonzero(np.isfinite(array)))


def _nonfinite_sources(rule: Rule, leaf: np.ndarray, tensors: Any) -> str:
    """The source tensors (and their files) behind the non-finite values of ``leaf``: the key
    tables only move values, so inverting the transform finds them."""
    parts = rule.transform.inverse(leaf)
    keys = [k for k, p in zip(rule.sources, parts, strict=True) if _nonfinite(p)] or rule.sources
    return ", ".join(f"{k!r}" + (f" [{tensors.file_of(k)}]" if k in tensors else "") for k in keys)


def _convert_component(
    source: Source,
    out: Path,
    dtype: np.dtype | None,
    batch_bytes: int,
    progress: bool,
    allow_nonfinite: bool = False,
) -> tuple[np.dtype, dict[str, str]]:
    """Streams one component into ``out/params``; returns the dtype stored and the checksum of
    every parameter. NaN or Inf values are refused, naming their tensors, unless
    ``allow_nonfinite``."""
    comp, what = COMPONENTS[source.component], f"{source.component} from {source.where}"
    tensors = _Tracked(source.tensors, what)
    view = comp.canonical(tensors, source.cfg)  # may read small buffers (CLIP's position ids)
    tensors.strict = True
    stored = {k: np.dtype(source.tensors.dtype_of(k)) for k in source.tensors}
    if dtype is None:  # lossless: bfloat16 only when no float16 or wider is stored
        wide = [d for d in stored.values() if jnp.issubdtype(d, jnp.floating) and d.itemsize > 1]
        dtype = DTYPES["bfloat16" if set(wide) <= {DTYPES["bfloat16"]} else "float32"]
    make = lambda: comp.model(source.cfg, rngs=nnx.Rngs(0), param_dtype=dtype)  # noqa: E731
    shapes = param_shapes(nnx.eval_shape(make))
    total = sum(int(np.prod(source.tensors.shape_of(k))) * d.itemsize for k, d in stored.items())
    start = time.perf_counter()
    with (
        _bar(total, source.component, progress) as bar,
        _LeafWriter(out / "params", shapes, dtype, batch_bytes) as writer,
    ):
        rules, nonfinite = {r.target: r for r in source.rules}, {}

        def on_leaf(name: str, array: np.ndarray) -> None:
            if bad := _nonfinite(array):
                where = _nonfinite_sources(rules[name], array, source.tensors)
                if not allow_nonfinite:
                    raise PortError(
                        what,
                        [
                            f"{bad} NaN or Inf value(s) in {where} (as {dtype.name}); pass "
                            "--allow-nonfinite (allow_nonfinite=True) to convert them anyway"
                        ],
                    )
                nonfinite[where] = bad
            writer(name, array)
            bar.update(tensors.bytes - bar.n)
            bar.set_postfix_str(f"{tensors.count}/{len(tensors)} tensors", refresh=False)

        try:
            to_target(view, source.rules, shapes, what=what, dtype=dtype, on_leaf=on_leaf)
        except PortError as err:  # name the shard file of each key the table complains about
            named = [
                f"{p} [{source.tensors.file_of(m.group(1))}]"
                if (m := re.search(r"source key '([^']+)'", p))
                and m.group(1) in tensors
                and not p.startswith("missing")
                else p
                for p in err.problems
            ]
            raise PortError(what, named) from None
    if nonfinite:
        log.warning(
            "%s: converted %d NaN or Inf value(s), as allowed, in %d tensor(s): %s",
            source.component,
            sum(nonfinite.values()),
            len(nonfinite),
            "; ".join(list(nonfinite)[:5]) + (" ..." if len(nonfinite) > 5 else ""),
        )
    gb, seconds = tensors.bytes / 1e9, time.perf_counter() - start
    log.info(
        "%s: %d tensors, %.3f GB in %.1f s (%.2f GB/s), stored as %s",
        source.component,
        tensors.count,
        gb,
        seconds,
        gb / seconds,
        dtype.name,
    )
    return dtype, writer.checksums


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    format: str = "auto",
    dtype: str | None = None,
    time_scale: float | None = None,
    components: Sequence[str] | None = None,
    config: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_bytes: int = BATCH_BYTES,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Converts a diffusers folder, BFL file or T2I-Distill ``.pt`` into a distill-jax folder.

    Args:
      src: a path, or a Hub id ``org/name[@revision][/folder or file]`` (a path that exists wins);
        an id fetches only what the wanted components need, into the Hub cache.
      format: ``"auto"`` (:func:`detect_format`) or one of :data:`FORMATS`.
      dtype: ``"bfloat16"`` or ``"float32"`` for the stored parameters; default lossless
        (bfloat16 when the source is bfloat16, else float32).
      time_scale: the transformer's time multiplier (:class:`FluxConfig`); default 1000 for
        diffusers and BFL weights (stock FLUX), 1 for T2I-Distill students.
      components: a subset of :data:`COMPONENTS` (default: every one the source has).
      config: a diffusers transformer ``config.json`` for a single file (default: inferred).
      allow_nonfinite: convert NaN and Inf weights (with a warning counting them) instead of
        refusing them.
      revision, subfolder: of a Hub id (they override or extend its ``@revision`` and path).
      token: for gated or private Hub models (default: ``HF_TOKEN`` or ``hf auth login``'s).
    Returns ``dst``; each component's config.json records a checksum of every parameter, the
    source's Hub id and commit, and the licence of the source's model card.
    """
    dst, start = Path(dst), time.perf_counter()
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format {format!r}: choose 'auto' or one of {FORMATS}")
    unknown = sorted(set(components or ()) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    dtype = parse_dtype(dtype)
    if time_scale is not None:
        check_time_scale(time_scale)
    found = hub.resolve(
        src,
        revision=revision,
        subfolder=subfolder,
        token=token,
        progress=progress,
        plan=lambda folder: source_files(folder, components),
    )
    src = found.path
    fmt = detect_format(src) if format == "auto" else format
    about = {"hub": found.hub} if found.hub else {}
    if meta := card.card_metadata(*([found.root] if found.root else [src, src.parent])):
        about["card"] = meta
    stop, pool = threading.Event(), concurrent.futures.ThreadPoolExecutor(1)
    try:
        with staging(dst, overwrite, src) as tmp:
            config = Path(config) if config else None
            sources, copies = open_sources(src, fmt, components, config, time_scale)
            hashes = {
                s.component: {f: pool.submit(_sha256, f, stop) for f in s.files} for s in sources
            }
            base = src if src.is_dir() else src.parent
            for s in sources:
                (tmp / s.component).mkdir(parents=True)
                stored, sums = _convert_component(
                    s, tmp / s.component, dtype, batch_bytes, progress, allow_nonfinite
                )
                sha = {
                    str(f.relative_to(base) if f.is_relative_to(base) else f): h.result()
                    for f, h in hashes[s.component].items()
                }
                origin = {"path": str(s.where.resolve()), "format": fmt, "sha256": sha, **about}
                model = COMPONENTS[s.component].model
                meta = component_meta(s.component, model, s.cfg, stored.name, origin, sums)
                write_json(tmp / s.component / "config.json", meta)
            for folder in copies:
                shutil.copytree(folder, tmp / folder.name)
            names = [s.component for s in sources]
            origin = {"path": str(src.resolve()), "format": fmt, **about}
            index = dict(format="distill-jax", version=1, components=names, source=origin)
            write_json(tmp / MARKER, {**index, "copied": [c.name for c in copies]})
    finally:
        stop.set()  # a failed conversion does not wait for hashes
        pool.shutdown(wait=True, cancel_futures=True)
    log.info("converted %s (%s) to %s in %.1f s", src, fmt, dst, time.perf_counter() - start)
    return dst


# --- export -----------------------------------------------------------------------------------


def _exported_tensors(
    folder: Path,
    meta: Mapping,
    rules: Sequence[Rule],
    shapes: Mapping,
    dtype: np.dtype,
    batch_bytes: int,
) -> Iterator[tuple[str, np.ndarray]]:
    """Diffusers-named tensors in rule order, restoring ``batch_bytes`` of leaves at a time (the
    other leaves are Orbax placeholders, never read), each batch checked against the folder's
    checksums."""
    stored = stored_dtype(meta, folder)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    chunk, size = [], 0
    for i, r in enumerate(rules):
        chunk.append(r)
        size += int(np.prod(shapes[r.target])) * dtype.itemsize
        if size < batch_bytes and i + 1 < len(rules):
            continue
        names = {c.target for c in chunk}
        target = {
            k: jax.ShapeDtypeStruct(s, dtype, sharding=cpu) if k in names else ocp.PLACEHOLDER
            for k, s in shapes.items()
        }
        leaves = load_params(folder, target)
        batch = {k: np.asarray(leaves[k]) for k in names}
        checksum.verify(folder, meta.get("checksums"), batch, stored, subset=True)
        yield from to_source(batch, chunk).items()
        chunk, size = [], 0


def export(
    src: str | Path,
    dst: str | Path,
    *,
    format: str = "diffusers",
    dtype: str | None = None,
    max_shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    batch_bytes: int = BATCH_BYTES,
) -> Path:
    """Writes the converted transformer at ``src`` for PyTorch.

    ``"diffusers"``: a folder of safetensors shards, ``diffusion_pytorch_model.safetensors.index
    .json``, ``config.json`` and a model card ``README.md`` (:mod:`distill_jax.card`: method,
    training, teacher, figures, and the code to sample it), read by
    ``FluxTransformer2DModel.from_pretrained`` and, heads and time scale included, by
    :class:`distill_jax.torch_students.FluxStudent`; the config's ``_distill_jax`` entry keeps
    ``time_scale``, the heads and the ``method`` (diffusers ignores it).
    ``"t2i-distill"``: a ``.pt`` holding ``{"module": state_dict}``, as the paper's code saves and
    loads students. Both keep the paper's names for the extra heads (``timestep_embedder2.*``,
    ``logvar_linear.*``), which diffusers reports as unexpected keys.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format {format!r}: choose one of {EXPORT_FORMATS}")
    src, dst = Path(src), Path(dst)
    folder, meta = component_folder(src, "transformer")
    cfg = config_from_json(FluxConfig, meta.get("config"), folder)
    facts = card.describe(folder, meta)
    dtype = parse_dtype(dtype) or stored_dtype(meta, folder)
    if format == "t2i-distill" and cfg.time_scale != 1.0:
        log.warning(
            "exporting a time_scale=%g model as a T2I-Distill .pt, whose code feeds "
            "times unscaled (time_scale 1)",
            cfg.time_scale,
        )
    rules = diffusers_rules(cfg)
    shapes = param_shapes(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), param_dtype=dtype)))
    specs = [
        (key, dtype, tuple(shape))
        for r in rules
        for key, shape in zip(r.sources, r.transform.source_shapes(shapes[r.target]), strict=True)
    ]
    total = sum(int(np.prod(s)) for _, _, s in specs) * dtype.itemsize
    with staging(dst, overwrite, src) as tmp, _bar(total, f"export {format}", progress) as bar:

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for key, array in _exported_tensors(folder, meta, rules, shapes, dtype, batch_bytes):
                bar.update(array.nbytes)
                yield key, array

        if format == "diffusers":
            tmp.mkdir()
            write_sharded(
                tmp,
                "diffusion_pytorch_model",
                specs,
                tensors(),
                max_shard_bytes=max_shard_bytes,
                metadata={"format": "pt"},
            )
            extra = {
                f: getattr(cfg, f)
                for f in (
                    "time_scale",
                    "delta_embed",
                    "delta_init",
                    "logvar_head",
                    *BEYOND_DIFFUSERS,
                )
            }
            extra.update(method=facts["kind"], source=str(folder.resolve()))
            write_json(tmp / "config.json", {**cfg.to_diffusers(), "_distill_jax": extra})
            card.write(tmp, dst, facts)
        else:
            torch_pt.save_pt(tmp, dict(tensors()))
    log.info("exported %s to %s (%s, %s)", folder, dst, format, dtype.name)
    return dst
