"""distill-jax folders: loading and saving converted components.

A converted folder (written by :func:`~distill_jax.convert.convert` and :func:`save_model`)::

    DST/distill_jax.json               the components and the source
    DST/<component>/config.json        model config (with time_scale), dtype, source, SHA-256s,
                                       parameter checksums (port.checksum; verified at load)
    DST/<component>/params/            Orbax checkpoint: nested dict of the nnx.Param leaves
    DST/tokenizer/, tokenizer_2/, scheduler/    copied verbatim from a pipeline folder

Components are named as in diffusers: ``transformer`` (:class:`Flux`), ``text_encoder`` (CLIP),
``text_encoder_2`` (T5), ``vae`` (:data:`~distill_jax.port.formats.COMPONENTS`). Every folder is
written to a temporary path beside its destination and renamed at the end (:func:`staging`), so a
failure leaves nothing behind and an existing folder untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import types
import typing
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx, traverse_util

from distill_jax import distributed
from distill_jax.models.flux import Flux
from distill_jax.pipeline import toy
from distill_jax.port import checksum
from distill_jax.port.formats import COMPONENTS, MARKER, read_json
from distill_jax.port.params import from_flat_params, param_shapes
from distill_jax.sharding import assert_not_replicated, state_shardings

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": np.dtype(jnp.bfloat16), "float32": np.dtype(jnp.float32)}


def parse_dtype(dtype: Any) -> np.dtype | None:
    """A parameter dtype given by name or dtype (one of :data:`DTYPES`), or None for None."""
    out = DTYPES.get(dtype) if isinstance(dtype, str) else dtype and np.dtype(dtype)
    if dtype is not None and out not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    return out


# --- writing ----------------------------------------------------------------------------------


def component_meta(
    component: str,
    model: type,
    cfg: Any,
    dtype: str,
    source: Mapping,
    checksums: Mapping[str, str],
) -> dict[str, Any]:
    """A converted component's config.json; ``checksums`` are :mod:`~distill_jax.port.checksum`'s
    of every parameter as stored, which :func:`load_model` verifies."""
    return dict(
        format="distill-jax",
        version=1,
        component=component,
        model=model.__name__,
        config=dataclasses.asdict(cfg),
        dtype=dtype,
        source=dict(source),
        checksums=checksum.record(checksums),
    )


def write_json(path: Path, obj: Mapping) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def staging(dst: Path, overwrite: bool, *sources: Path) -> Iterator[Path]:
    """A temporary path beside ``dst`` that replaces it on success and is removed on failure;
    an existing ``dst`` stays untouched until the very end. Collective on many processes: all
    get the same path, and process 0 alone renames or removes."""
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    for src in sources:
        a, b = src.resolve(), dst.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise ValueError(f"destination {dst} overlaps the source {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{distributed.shared_token()}"
    primary = distributed.is_primary()

    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        distributed.sync(f"staged {dst}")  # every process has written its part
        if primary:
            if dst.exists() or dst.is_symlink():
                dst.rename(old)
            tmp.rename(dst)
    except BaseException:
        if primary:
            if (old.exists() or old.is_symlink()) and not dst.exists():
                old.rename(dst)  # the rename failed: put the original back
            remove(tmp)
        raise
    if primary:
        remove(old)
    distributed.sync(f"renamed {dst}")


def save_model(
    model: nnx.Module,
    dst: str | Path,
    *,
    overwrite: bool = False,
    source: Mapping | None = None,
    dtype: str | None = None,
) -> Path:
    """Writes ``model`` (e.g. a trained student) as a converted component folder, which
    :func:`load_model` and :func:`~distill_jax.convert.export` read; sharded arrays are saved as
    they lie (collective on many processes: every one calls it). ``dtype`` (e.g.
    ``"bfloat16"``) stores the parameters cast to it; by default they keep their own."""
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
    with staging(Path(dst), overwrite) as tmp:
        if distributed.is_primary():
            tmp.mkdir()
        distributed.sync(f"made {tmp}")
        ocp.save_pytree((tmp / "params").absolute(), traverse_util.unflatten_dict(params, sep="."))
        if distributed.is_primary():
            meta = component_meta(name, type(model), model.cfg, dtypes.pop(), source or {}, sums)
            write_json(tmp / "config.json", meta)
    return Path(dst)


def save_toy(
    pipeline: toy.ToyPipeline, dst: str | Path, meta: Mapping | None = None, *, dtype: Any = None
) -> Path:
    """Writes a toy pipeline folder: ``dst/transformer`` and ``dst/text_encoder_2`` (as by
    :func:`save_model`, ``dtype`` included), the converted-folder marker (so ``load_flux(dst)``
    and ``config.teacher.path=dst`` work) and ``dst/toy.json``: the world it reads, and
    ``meta``. Collective on many processes."""
    dst = Path(dst).absolute()  # Orbax refuses relative paths
    for name, model in zip(toy.COMPONENTS, (pipeline.transformer, pipeline.t5), strict=True):
        save_model(model, dst / name, overwrite=True, dtype=dtype)
    if distributed.is_primary():
        marker = {"format": "distill-jax", "version": 1, "components": list(toy.COMPONENTS)}
        write_json(dst / MARKER, {**marker, "copied": [], "source": {"format": "toy"}})
        _write_toy_meta(dst, {"world": pipeline.world(), **(meta or {})})
    distributed.sync(f"saved {dst}")
    return dst


def save_toy_meta(path: str | Path, meta: Mapping) -> None:
    """Adds (or replaces) top-level entries of the toy folder's ``toy.json``; its world stays."""
    path = Path(path)
    current = read_json(path / toy.META_FILE)
    _write_toy_meta(path, {**current, **meta, "world": current["world"]})


def _write_toy_meta(path: Path, meta: Mapping) -> None:
    """``toy.json`` written whole or not at all (a temporary file renamed over it)."""
    tmp = path / (toy.META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path / toy.META_FILE)


# --- reading ----------------------------------------------------------------------------------


def component_folder(path: Path, component: str | None = None) -> tuple[Path, dict]:
    """The folder of ``component`` in a converted pipeline, or ``path`` itself when it is a
    converted component folder; and its config.json."""
    folder = path / component if component and (path / MARKER).is_file() else path
    meta = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
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


def config_from_json(cls: type, fields: Any, where: Path) -> Any:
    """``cls`` from the ``config`` object of a converted config.json: every field present and of
    its type; a one-line ValueError naming the file and each bad field otherwise."""
    path = where / "config.json"
    if not isinstance(fields, Mapping):
        raise ValueError(f"{path}: 'config' is a {type(fields).__name__}, not an object")
    # Fields added since version 1 take the value that folders written before them meant.
    fields = {**getattr(cls, "ADDED_FIELDS", {}), **fields}
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


def stored_dtype(meta: Mapping, folder: Path) -> np.dtype:
    """The dtype the parameters of a converted folder are stored in (its config.json's)."""
    stored = meta.get("dtype")
    if not (isinstance(stored, str) and stored in DTYPES):
        raise ValueError(f"{folder / 'config.json'}: dtype {stored!r} is not one of {list(DTYPES)}")
    return DTYPES[stored]


def load_params(folder: Path, target: Mapping[str, Any]) -> dict[str, Any]:
    """``ocp.load`` of ``folder/params`` into ``target``, both flat ``{dotted path: leaf}``
    (``ocp.PLACEHOLDER`` leaves are not read); a damaged checkpoint is a one-line error naming
    the folder."""
    try:
        tree = ocp.load(
            (folder / "params").absolute(), traverse_util.unflatten_dict(target, sep=".")
        )
    except Exception as err:  # Orbax and tensorstore raise ValueError, OSError, RuntimeError, ...
        why = str(err).strip().split("\n")[0][:300]
        raise ValueError(
            f"{folder / 'params'}: cannot read the parameters ({type(err).__name__}: {why}); "
            "the folder is damaged or incomplete: convert (or save) it again"
        ) from None
    return traverse_util.flatten_dict(tree, sep=".")


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
    """Restores a converted component (any of :data:`~distill_jax.port.formats.COMPONENTS`).

    ``dtype`` is the parameter dtype (default: as stored; Orbax casts while reading),
    ``compute_dtype`` the activations' (default: ``dtype``). With a ``mesh`` each parameter is
    read straight into its ``NamedSharding`` from the logical-axis ``rules`` (default:
    ``sharding.DEFAULT_RULES``), so no device ever holds the whole model; without a mesh, onto the
    first local device. ``model_kw`` go to the model's
    constructor (e.g. ``remat``, ``attn_impl`` for :class:`Flux`).
    """
    folder, meta = component_folder(Path(path), component)
    comp = COMPONENTS[meta["component"]]
    cfg = config_from_json(comp.config, meta.get("config"), folder)
    stored = stored_dtype(meta, folder)
    dtype = parse_dtype(dtype) or stored
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
    restored = load_params(folder, target)
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
    four networks (each restored as by :func:`load_model`) and the two tokenizers; or, for a toy
    pipeline folder (one with a ``toy.json``), a :class:`~distill_jax.pipeline.toy.ToyPipeline`
    (:func:`load_toy`, float32 unless ``dtype`` says otherwise)."""
    from distill_jax.pipeline.pipeline import Pipeline
    from distill_jax.pipeline.text import load_tokenizers

    path = Path(path)
    if (path / toy.META_FILE).is_file():
        return load_toy(path, dtype=dtype or "float32", mesh=mesh)
    fields = dict(transformer="transformer", clip="text_encoder", t5="text_encoder_2", vae="vae")
    parts = {f: load_model(path, component=c, mesh=mesh, dtype=dtype) for f, c in fields.items()}
    clip_tokenizer, t5_tokenizer = load_tokenizers(path / "tokenizer", path / "tokenizer_2")
    pipeline = Pipeline(**parts, clip_tokenizer=clip_tokenizer, t5_tokenizer=t5_tokenizer)
    pipeline.check()
    return pipeline


def toy_world(path: str | Path) -> dict[str, Any]:
    """``{vocab, text_len, autoencoder, text_context}`` of the toy pipeline folder at ``path``
    (:class:`~distill_jax.pipeline.toy.ToyPipeline`'s fields): its ``toy.json`` (a world with
    only a ``patch`` reads pixels folded that many to a side; without ``text_context``, words
    alone)."""
    meta_path = Path(path) / toy.META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} holds no {toy.META_FILE}: not a toy pipeline folder")
    world = read_json(meta_path).get("world")
    try:
        ae = world.get("autoencoder")
        ae = toy.autoencoder_from_json(ae) if ae else toy.Autoencoder.pixels(int(world["patch"]))
        return {
            "vocab": tuple(world["vocab"]),
            "text_len": int(world["text_len"]),
            "autoencoder": ae,
            "text_context": int(world.get("text_context", 0)),
        }
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"{meta_path}: 'world' needs vocab, text_len and an autoencoder (or patch): {e}"
        ) from None


def load_toy(
    path: str | Path, *, dtype: Any = "float32", mesh: jax.sharding.Mesh | None = None
) -> toy.ToyPipeline:
    """The toy pipeline folder at ``path`` (written by :func:`save_toy`); parameters in
    ``dtype`` (float32 by default: the shipped teacher is stored in bfloat16 only to halve its
    files), restored as by :func:`load_model`."""
    world = toy_world(path)
    parts = [load_model(path, component=c, mesh=mesh, dtype=dtype) for c in toy.COMPONENTS]
    pipeline = toy.ToyPipeline(*parts, **world)
    pipeline.check()
    return pipeline
