"""Hugging Face Hub ids as checkpoint sources: ``org/name[@revision][/path]`` -> a local path.

An id names a model repository, optionally a revision (branch, tag or commit; a revision holding
``/`` is written URL-encoded, ``refs%2Fpr%2F1``, as ``huggingface_hub.HfFileSystem`` writes it) and
a folder or file inside it (``black-forest-labs/FLUX.1-dev/transformer``, or
``black-forest-labs/FLUX.1-dev/flux1-dev.safetensors``). :func:`resolve` fetches only the files the
caller needs into the Hub cache with ``huggingface_hub.snapshot_download`` (its progress bar, its
cache, ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` / ``HF_TOKEN``, and ``hf auth login``'s
stored token) and returns the path inside the cached snapshot. A path that exists on disk is
always taken as a path, never as an id.

No JAX here: :mod:`distill_jax.torch_students` resolves exported students with it too.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# Files of one checkpoint, not repositories: ``out/model.safetensors`` that does not exist is a
# mistyped path, not the model ``model.safetensors`` of the user ``out``.
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
CARD = "README.md"  # the Hub's model card, whose front matter carries the licence
# What is fetched first from a folder: enough to see its layout and its weight files.
LAYOUT = ("model_index.json", "config.json", "*/config.json", "*.index.json", "*/*.index.json")

_ID = re.compile(r"(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[^/@]+))?(?:/(?P<path>.*))?")


class HubError(OSError):
    """A Hub id that could not be resolved, with what to do about it in one line."""


@dataclasses.dataclass(frozen=True)
class HubId:
    """``repo_id`` (``org/name``), an optional ``revision`` and a ``path`` inside the repo."""

    repo_id: str
    revision: str | None = None
    path: str = ""

    def __str__(self) -> str:
        rev = f"@{urllib.parse.quote(self.revision, safe='')}" if self.revision else ""
        return self.repo_id + rev + (f"/{self.path}" if self.path else "")

    @property
    def is_file(self) -> bool:
        return self.path.endswith(FILE_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a source lies on disk: ``path``; for a Hub id also the snapshot ``root`` and
    ``hub`` (``repo_id``, ``revision`` asked for, ``commit`` found, ``path`` inside)."""

    path: Path
    root: Path | None = None
    hub: dict[str, Any] | None = None


def parse_hub_id(text: str) -> HubId | None:
    """The :class:`HubId` that ``text`` spells, or None when it cannot be one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    m = _ID.fullmatch(str(text))
    if m is None or m["repo"].endswith(FILE_SUFFIXES):
        return None
    try:
        validate_repo_id(m["repo"])
    except HFValidationError:
        return None
    parts = [p for p in (m["path"] or "").split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    rev = urllib.parse.unquote(m["rev"]) if m["rev"] else None
    return HubId(m["repo"], rev, "/".join(parts))


def cache_dir() -> str:
    """The Hub cache in use (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ~/.cache/...)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve(
    src: str | Path,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
    plan: Callable[[Path], Sequence[str]] | None = None,
) -> Resolved:
    """A local path or a Hub id -> where it lies on disk.

    A path that exists is returned as it is (joined with ``subfolder``). Anything else that reads
    as an id is fetched: a file alone (with the repo's model card); a folder in two passes, first
    its JSON files (:data:`LAYOUT`), then ``plan(folder)``, glob patterns relative to the folder
    of the files the caller will read (everything in it when ``plan`` is None).

    Args:
      revision, subfolder: override or extend the id's own ``@revision`` and path.
      token: a Hub token; None uses ``HF_TOKEN`` or the one ``hf auth login`` stored.
      progress: the Hub's download progress bars.
    Raises:
      FileNotFoundError: neither an existing path nor an id.
      HubError: the id could not be fetched (gated, private, unknown, not cached while offline),
        saying how to fix it.
    """
    local = Path(src)
    ref = None if local.exists() else parse_hub_id(str(src))
    if ref is None:
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hub ids; {src} is a local path")
        path = local / subfolder if subfolder else local
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (nor is it a Hub id, org/name)")
        return Resolved(path)
    path = "/".join(p for p in (ref.path, (subfolder or "").strip("/")) if p)
    ref = dataclasses.replace(ref, revision=revision or ref.revision, path=path)
    prefix = f"{ref.path}/" if ref.path else ""
    if ref.is_file:
        root = _snapshot(ref, [ref.path, CARD], token, progress)
    else:
        root = _snapshot(ref, [prefix + p for p in LAYOUT] + [CARD], token, progress)
        wanted = ["*"] if plan is None else list(plan(root / ref.path))
        pinned = dataclasses.replace(ref, revision=root.name)  # the commit just resolved
        _snapshot(pinned, [prefix + p for p in wanted], token, progress)
    found = root / ref.path
    if not found.exists():
        raise HubError(
            f"{ref}: the Hub snapshot {root} (commit {root.name}) has no {ref.path!r}"
            + (" (offline: only cached files are seen)" if _offline() else "")
        )
    hub = dict(repo_id=ref.repo_id, revision=ref.revision, commit=root.name, path=ref.path)
    return Resolved(found, root, hub)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"


def _snapshot(ref: HubId, patterns: list[str], token: Any, progress: bool) -> Path:
    """``snapshot_download`` of ``patterns``, its failures as one-line :class:`HubError`."""
    import huggingface_hub
    from huggingface_hub import errors

    kw = {} if progress else {"tqdm_class": _Silent}
    page = f"https://huggingface.co/{ref.repo_id}"
    try:
        return Path(
            huggingface_hub.snapshot_download(
                ref.repo_id, revision=ref.revision, allow_patterns=patterns, token=token, **kw
            )
        )
    except errors.GatedRepoError:
        raise HubError(
            f"{ref.repo_id} is gated: accept its conditions at {page} with your account, then "
            f"{_LOGIN}"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(
            f"{ref.repo_id} has no revision {ref.revision or 'main'!r} ({page})"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{ref}: no such local path, and no Hub model {ref.repo_id} that you may read "
            f"(mistyped, or private: {_LOGIN})"
        ) from None
    except errors.LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        raise HubError(
            f"{ref}: no such local path, and not in the Hub cache at {cache_dir()} while {why} "
            f"({type(err).__name__}); download it once online (`hf download {ref.repo_id}`), or "
            "point HF_HUB_CACHE (or HF_HOME) at a cache that holds it"
        ) from None
    except errors.HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise HubError(f"{ref.repo_id}: not authorised ({status}); {_LOGIN}") from None
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"{ref}: the Hub answered {status}: {line}") from None


class _Silent(tqdm):
    """``tqdm_class`` for ``progress=False``: every bar disabled."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


__all__ = ["HubError", "HubId", "Resolved", "cache_dir", "parse_hub_id", "resolve"]
