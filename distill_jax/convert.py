"""Checkpoints in and out: ``convert`` FLUX-world weights into distill-jax folders, ``export``
students back to PyTorch, and ``load_flux`` / ``load_pipeline`` to restore them.

Sources (:func:`detect_format`):

- ``diffusers``: a pipeline folder (``model_index.json``: FLUX.1-dev, Freepik/flux.1-lite-8B), one
  component folder (``config.json`` and ``*.safetensors``, sharded with an index or not), or one
  ``.safetensors`` file holding a transformer in diffusers naming;
- ``bfl``: a BFL single file (``flux1-dev.safetensors`` naming);
- ``t2i-distill``: a ``.pt`` holding ``{"module": state_dict}`` in diffusers naming, with the
  students' extra heads ``timestep_embedder2.*`` (MeanFlow) and ``logvar_linear.*`` (sCM).

A converted folder::

    DST/distill_jax.json               the components and the source
    DST/<component>/config.json        model config (with time_scale), dtype, source, SHA-256s,
                                       parameter checksums (port.checksum; verified at load)
    DST/<component>/params/            Orbax checkpoint: nested dict of the nnx.Param leaves
    DST/tokenizer/, tokenizer_2/, scheduler/    copied verbatim from a pipeline folder

Components are named as in diffusers: ``transformer`` (:class:`Flux`), ``text_encoder`` (CLIP),
``text_encoder_2`` (T5), ``vae``. Conversion streams: tensors are read one at a time, mapped by the
component's key table (``port.table.to_target`` with ``on_leaf``) and written :data:`BATCH_BYTES`
at a time with Orbax's partial save, so memory holds two batches and a tensor, never a copy of the
model. Everything is written to a temporary path beside DST, renamed at the end, and removed on
any failure. NaN and Inf weights are refused unless ``allow_nonfinite``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import threading
import time
import types
import typing
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx
from tqdm.auto import tqdm

from distill_jax.models.flux import Flux, FluxConfig, check_time_scale
from distill_jax.port import checksum, torch_pt
from distill_jax.port.flux import diffusers_rules
from distill_jax.port.formats import (
    COMPONENTS,
    FORMATS,
    MARKER,
    _open_sources,
    _read_json,
    _Source,
    detect_format,
)
from distill_jax.port.params import from_flat_params, param_shapes
from distill_jax.port.safetensors_io import write_sharded
from distill_jax.port.table import PortError, Rule, to_source, to_target
from distill_jax.sharding import assert_not_replicated, state_shardings

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("diffusers", "t2i-distill")
DTYPES = {"bfloat16": np.dtype(jnp.bfloat16), "float32": np.dtype(jnp.float32)}
BATCH_BYTES = 512 << 20  # leaves per Orbax partial save; at most two batches are in memory
SHARD_BYTES = 10 << 30  # diffusers' default max_shard_size

# --- writing converted folders ----------------------------------------------------------------


def _nest(flat: Mapping[str, Any]) -> dict:
    """``{"a.0.b": x}`` -> ``{"a": {"0": {"b": x}}}``: the tree Orbax stores."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {prefix + k: v})
    return out


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
                self.pending = ocp.partial.save_async(self.path, _nest(self.batch))
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


def _meta(
    component: str,
    model: type,
    cfg: Any,
    dtype: str,
    source: Mapping,
    checksums: Mapping[str, str],
) -> dict[str, Any]:
    """A converted component's config.json; ``checksums`` are :mod:`~distill_jax.port.checksum`'s
    of every parameter as stored, which :func:`load_model` verifies."""
    config = dataclasses.asdict(cfg)
    return dict(
        format="distill-jax",
        version=1,
        component=component,
        model=model.__name__,
        config=config,
        dtype=dtype,
        source=dict(source),
        checksums=checksum.record(checksums),
    )


def _dtype(dtype: Any) -> np.dtype | None:
    out = DTYPES.get(dtype) if isinstance(dtype, str) else dtype and np.dtype(dtype)
    if dtype is not None and out not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    return out


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
    source: _Source,
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


def _write_json(path: Path, obj: Mapping) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def _staging(dst: Path, overwrite: bool, *sources: Path) -> Iterator[Path]:
    """A temporary path beside ``dst`` that replaces it on success and is removed on failure;
    an existing ``dst`` stays untouched until the very end."""
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    for src in sources:
        a, b = src.resolve(), dst.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise ValueError(f"destination {dst} overlaps the source {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"

    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if dst.exists() or dst.is_symlink():
            dst.rename(old)
        tmp.rename(dst)
    except BaseException:
        if (old.exists() or old.is_symlink()) and not dst.exists():
            old.rename(dst)  # the rename failed: put the original back
        remove(tmp)
        raise
    remove(old)


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
) -> Path:
    """Converts a diffusers folder, BFL file or T2I-Distill ``.pt`` into a distill-jax folder.

    Args:
      format: ``"auto"`` (:func:`detect_format`) or one of :data:`FORMATS`.
      dtype: ``"bfloat16"`` or ``"float32"`` for the stored parameters; default lossless
        (bfloat16 when the source is bfloat16, else float32).
      time_scale: the transformer's time multiplier (:class:`FluxConfig`); default 1000 for
        diffusers and BFL weights (stock FLUX), 1 for T2I-Distill students.
      components: a subset of :data:`COMPONENTS` (default: every one the source has).
      config: a diffusers transformer ``config.json`` for a single file (default: inferred).
      allow_nonfinite: convert NaN and Inf weights (with a warning counting them) instead of
        refusing them.
    Returns ``dst``; each component's config.json records a checksum of every parameter.
    """
    src, dst, start = Path(src), Path(dst), time.perf_counter()
    fmt = detect_format(src) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"format {format!r}: choose 'auto' or one of {FORMATS}")
    unknown = sorted(set(components or ()) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    dtype = _dtype(dtype)
    if time_scale is not None:
        check_time_scale(time_scale)
    stop, pool = threading.Event(), concurrent.futures.ThreadPoolExecutor(1)
    try:
        with _staging(dst, overwrite, src) as tmp:
            config = Path(config) if config else None
            sources, copies = _open_sources(src, fmt, components, config, time_scale)
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
                origin = {"path": str(s.where.resolve()), "format": fmt, "sha256": sha}
                model = COMPONENTS[s.component].model
                meta = _meta(s.component, model, s.cfg, stored.name, origin, sums)
                _write_json(tmp / s.component / "config.json", meta)
            for folder in copies:
                shutil.copytree(folder, tmp / folder.name)
            names = [s.component for s in sources]
            origin = {"path": str(src.resolve()), "format": fmt}
            index = dict(format="distill-jax", version=1, components=names, source=origin)
            _write_json(tmp / MARKER, {**index, "copied": [c.name for c in copies]})
    finally:
        stop.set()  # a failed conversion does not wait for hashes
        pool.shutdown(wait=True, cancel_futures=True)
    log.info("converted %s (%s) to %s in %.1f s", src, fmt, dst, time.perf_counter() - start)
    return dst


# --- loading and saving converted folders -----------------------------------------------------


def _component_folder(path: Path, component: str | None = None) -> tuple[Path, dict]:
    """The folder of ``component`` in a converted pipeline, or ``path`` itself when it is a
    converted component folder; and its config.json."""
    folder = path / component if component and (path / MARKER).is_file() else path
    meta = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if meta.get("format") != "distill-jax" or meta.get("component") not in COMPONENTS:
        raise ValueError(
            f"{path} is not a converted distill-jax folder"
            + (f" with a {component}" if component else "")
            + "; convert it first (distill-jax convert SRC DST)"
        )
    if component and meta["component"] != component:
        raise ValueError(f"{folder} holds a {meta['component']}, not a {component}")
    return folder, meta


def _json_fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of a config field's type: ints are ints (not floats or bools),
    floats finite numbers, tuples lists."""
    if hint is float:
        return type(value) is int or (type(value) is float and math.isfinite(value))
    if hint in (int, bool, str, type(None)):
        return type(value) is hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_json_fits(value, a) for a in args)
    if typing.get_origin(hint) is tuple and args[1:] == (Ellipsis,):
        return type(value) is list and all(_json_fits(v, args[0]) for v in value)
    raise TypeError(f"no JSON type check for {hint}")


def _config_from_json(cls: type, fields: Any, where: Path) -> Any:
    """``cls`` from the ``config`` object of a converted config.json: every field present and of
    its type; a one-line ValueError naming the file and each bad field otherwise."""
    path = where / "config.json"
    if not isinstance(fields, Mapping):
        raise ValueError(f"{path}: 'config' is a {type(fields).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    wanted = [f.name for f in dataclasses.fields(cls)]
    problems = [f"missing field {k!r}" for k in wanted if k not in fields]
    problems += [f"unknown field {k!r}" for k in fields if k not in hints]
    problems += [
        f"{k} is {json.dumps(v)[:40]}, expected {getattr(hints[k], '__name__', hints[k])}"
        for k, v in fields.items()
        if k in hints and not _json_fits(v, hints[k])
    ]
    if problems:
        raise ValueError(f"{path}: bad {cls.__name__}: " + "; ".join(problems))
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad {cls.__name__} ({err})") from None


def _stored_dtype(meta: Mapping, folder: Path) -> np.dtype:
    stored = meta.get("dtype")
    if not (isinstance(stored, str) and stored in DTYPES):
        raise ValueError(f"{folder / 'config.json'}: dtype {stored!r} is not one of {list(DTYPES)}")
    return DTYPES[stored]


def _load_params(folder: Path, target: Any) -> Any:
    """``ocp.load`` of ``folder/params`` into ``target``; a damaged checkpoint is a one-line
    error naming the folder."""
    try:
        return ocp.load((folder / "params").absolute(), target)
    except Exception as err:  # Orbax and tensorstore raise ValueError, OSError, RuntimeError, ...
        why = str(err).strip().split("\n")[0][:300]
        raise ValueError(
            f"{folder / 'params'}: cannot read the parameters ({type(err).__name__}: {why}); "
            "the folder is damaged or incomplete: convert (or save) it again"
        ) from None


def load_model(
    path: str | Path,
    *,
    component: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    dtype: Any = None,
    compute_dtype: Any = None,
    **model_kw: Any,
) -> nnx.Module:
    """Restores a converted component (any of :data:`COMPONENTS`).

    ``dtype`` is the parameter dtype (default: as stored; Orbax casts while reading),
    ``compute_dtype`` the activations' (default: ``dtype``). With a ``mesh`` each parameter is
    read straight into its ``NamedSharding`` from the logical-axis ``rules`` (default:
    ``sharding.DEFAULT_RULES``), so no device ever holds the whole model; without a mesh, onto the
    first local device. ``model_kw`` go to the model's
    constructor (e.g. ``remat``, ``attn_impl`` for :class:`Flux`).
    """
    folder, meta = _component_folder(Path(path), component)
    comp = COMPONENTS[meta["component"]]
    cfg = _config_from_json(comp.config, meta.get("config"), folder)
    stored = _stored_dtype(meta, folder)
    dtype = _dtype(dtype) or stored
    abstract = nnx.eval_shape(
        lambda: comp.model(
            cfg, rngs=nnx.Rngs(0), dtype=compute_dtype or dtype, param_dtype=dtype, **model_kw
        )
    )
    shapes = param_shapes(abstract)
    if mesh is None:
        shardings = dict.fromkeys(shapes, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    else:
        state = nnx.state(abstract, nnx.Param)
        named = state_shardings(state, mesh, rules)
        if mesh.size > 1:
            assert_not_replicated(state, named)
        shardings = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(named)}
    target = {k: jax.ShapeDtypeStruct(s, dtype, sharding=shardings[k]) for k, s in shapes.items()}
    restored = _flatten(_load_params(folder, _nest(target)))
    checked = checksum.verify(folder, meta.get("checksums"), restored, stored)
    log.info("restored the %s (%s, %s) from %s", meta["component"], dtype.name, checked, folder)
    return from_flat_params(abstract, restored)


def load_flux(
    path: str | Path, *, mesh: jax.sharding.Mesh | None = None, dtype: Any = None, **kw: Any
) -> Flux:
    """The converted FLUX transformer at ``path`` (a converted pipeline or its ``transformer``
    folder); see :func:`load_model` for ``mesh``, ``dtype`` and the keywords."""
    return load_model(path, component="transformer", mesh=mesh, dtype=dtype, **kw)


def load_pipeline(
    path: str | Path, *, dtype: Any = None, mesh: jax.sharding.Mesh | None = None
) -> Any:
    """A :class:`~distill_jax.pipeline.pipeline.Pipeline` from a converted pipeline folder: the
    four networks (each restored as by :func:`load_model`) and the two tokenizers."""
    from distill_jax.pipeline.pipeline import Pipeline
    from distill_jax.pipeline.text import load_tokenizers

    path = Path(path)
    fields = dict(transformer="transformer", clip="text_encoder", t5="text_encoder_2", vae="vae")
    parts = {f: load_model(path, component=c, mesh=mesh, dtype=dtype) for f, c in fields.items()}
    clip_tokenizer, t5_tokenizer = load_tokenizers(path / "tokenizer", path / "tokenizer_2")
    pipeline = Pipeline(**parts, clip_tokenizer=clip_tokenizer, t5_tokenizer=t5_tokenizer)
    pipeline.check()
    return pipeline


def save_model(
    model: nnx.Module,
    dst: str | Path,
    *,
    overwrite: bool = False,
    source: Mapping | None = None,
    dtype: str | None = None,
) -> Path:
    """Writes ``model`` (e.g. a trained student) as a converted component folder, which
    :func:`load_model` and :func:`export` read; sharded arrays are saved as they lie. ``dtype``
    (e.g. ``"bfloat16"``) stores the parameters cast to it; by default they keep their own."""
    name = next((n for n, c in COMPONENTS.items() if isinstance(model, c.model)), None)
    if name is None:
        raise TypeError(
            f"cannot save a {type(model).__name__}; expected one of "
            f"{[c.model.__name__ for c in COMPONENTS.values()]}"
        )
    params = {
        ".".join(map(str, p)): v.get_value() if dtype is None else v.get_value().astype(dtype)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    dtypes = {np.dtype(v.dtype).name for v in params.values()}
    if len(dtypes) != 1:
        raise ValueError(f"parameters of several dtypes {sorted(dtypes)}; cast them to one")
    sums = checksum.checksums(params)
    with _staging(Path(dst), overwrite) as tmp:
        tmp.mkdir()
        ocp.save_pytree((tmp / "params").absolute(), _nest(params))
        meta = _meta(name, type(model), model.cfg, dtypes.pop(), source or {}, sums)
        _write_json(tmp / "config.json", meta)
    return Path(dst)


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
    stored = _stored_dtype(meta, folder)
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
        leaves = _flatten(_load_params(folder, _nest(target)))
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
    .json`` and ``config.json``, read by ``FluxTransformer2DModel.from_pretrained``; the config's
    ``_distill_jax`` entry keeps ``time_scale`` and the heads (diffusers ignores it).
    ``"t2i-distill"``: a ``.pt`` holding ``{"module": state_dict}``, as the paper's code saves and
    loads students. Both keep the paper's names for the extra heads (``timestep_embedder2.*``,
    ``logvar_linear.*``), which diffusers reports as unexpected keys.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format {format!r}: choose one of {EXPORT_FORMATS}")
    src, dst = Path(src), Path(dst)
    folder, meta = _component_folder(src, "transformer")
    cfg = _config_from_json(FluxConfig, meta.get("config"), folder)
    dtype = _dtype(dtype) or _stored_dtype(meta, folder)
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
    with _staging(dst, overwrite, src) as tmp, _bar(total, f"export {format}", progress) as bar:

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
                for f in ("time_scale", "delta_embed", "delta_init", "logvar_head")
            }
            extra["source"] = str(folder.resolve())
            _write_json(tmp / "config.json", {**cfg.to_diffusers(), "_distill_jax": extra})
        else:
            torch_pt.save_pt(tmp, dict(tensors()))
    log.info("exported %s to %s (%s, %s)", folder, dst, format, dtype.name)
    return dst
