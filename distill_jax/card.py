"""The model card (``README.md``) that :func:`~distill_jax.convert.export` writes with a student.

The Hub's conventions: YAML front matter (``library_name``, ``base_model`` when the teacher came
from the Hub, ``pipeline_tag``, the licence carried over from the teacher's own card), then what
the model is (method, steps trained, ``time_scale``), where it came from (the teacher's path or
Hub id and hashes), the training config when the exported folder is a training run's student,
the demo's figures when they exist, and the code that samples it in PyTorch and in distill-jax.
Everything is read from files beside the source (:func:`describe`); nothing is recomputed.

A training run's student lies in ``WORKDIR/student`` beside ``WORKDIR/checkpoints/<step>/config``
(the run's config as JSON, :mod:`distill_jax.checkpoint`); the demo trains in ``DEMO/<method>``
and draws ``DEMO/samples.png`` and ``DEMO/accuracy.png``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from distill_jax.port.formats import MARKER, read_json

LICENSE_KEYS = ("license", "license_name", "license_link")
FIGURES = ("samples.png", "accuracy.png")
# The sampler of each model kind, and its default steps and guidance (spec 5.5).
SAMPLERS = {"teacher": (28, 3.5), "scm": (2, 4.5), "meanflow": (4, 3.5)}
TITLES = {
    "teacher": "flow-matching model (FLUX's Euler sampler)",
    "flow_matching": "flow-matching model (FLUX's Euler sampler)",
    "rescale": "rescaled teacher (time_scale 1; FLUX's Euler sampler)",
    "scm": "sCM student (TrigFlow continuous-time consistency, few-step sampler)",
    "meanflow": "MeanFlow student (average-velocity few-step sampler)",
}


def card_metadata(*folders: Path) -> dict[str, Any]:
    """The licence fields of the first ``README.md`` with YAML front matter in ``folders`` (a Hub
    model card); ``{}`` when there is none."""
    for folder in folders:
        path = Path(folder) / "README.md"
        if not path.is_file():
            continue
        try:
            meta = front_matter(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        return {k: meta[k] for k in LICENSE_KEYS if meta.get(k)}
    return {}


def front_matter(text: str) -> dict[str, Any]:
    """The YAML between a card's opening ``---`` lines (``{}`` without any)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except (StopIteration, yaml.YAMLError) as err:
        raise ValueError(f"model card front matter is not YAML ({err})") from None
    return meta if isinstance(meta, dict) else {}


def kind(cfg: Mapping[str, Any]) -> str:
    """The sampler a model of FluxConfig fields ``cfg`` runs: its heads tell the student."""
    return "meanflow" if cfg.get("delta_embed") else "scm" if cfg.get("logvar_head") else "teacher"


def _json(path: Path) -> dict:
    try:
        return read_json(path) if path.is_file() else {}
    except ValueError:
        return {}


def origin(path: Path) -> dict[str, Any]:
    """What a converted folder (a pipeline or its ``transformer``) says of its own source:
    ``path``, ``format``, ``hub``, ``card``, ``sha256`` (of the source files) and ``params``
    (SHA-256 of its recorded parameter checksums)."""
    path = Path(path)
    root = next((f for f in (path, path.parent) if (f / MARKER).is_file()), None)
    folder = root / "transformer" if root and (root / "transformer").is_dir() else path
    comp = _json(folder / "config.json")
    out = {**_json(root / MARKER).get("source", {})} if root else {}
    out = {**comp.get("source", {}), **out}  # the pipeline's path over the component's
    out["sha256"] = comp.get("source", {}).get("sha256", {})
    if comp.get("checksums"):
        record = json.dumps(comp["checksums"], sort_keys=True).encode()
        out["params"] = hashlib.sha256(record).hexdigest()
    out["folder"] = str(path.resolve())
    return out


def _run(workdir: Path) -> tuple[int | None, dict]:
    """The newest saved step of a training run's checkpoints and the run's config."""
    steps = sorted(
        int(p.name)
        for p in (workdir / "checkpoints").glob("*")
        if p.name.isdigit() and (p / "config" / "metadata").is_file()
    )
    if not steps:
        return None, {}
    try:
        config = json.loads(
            (workdir / "checkpoints" / str(steps[-1]) / "config" / "metadata").read_text()
        )
    except (OSError, ValueError):
        config = {}
    return steps[-1], config if isinstance(config, dict) else {}


def describe(folder: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The facts of a card for the converted transformer ``folder`` with config.json ``meta``."""
    folder = Path(folder).resolve()
    cfg = dict(meta.get("config") or {})
    root = folder.parent if (folder.parent / MARKER).is_file() else folder
    toy = _json(root / "toy.json")
    facts: dict[str, Any] = dict(cfg=cfg, kind=kind(cfg), root=str(root), dtype=meta.get("dtype"))
    facts["pipeline"] = bool(toy) or all(
        (root / c / "config.json").is_file()
        for c in ("transformer", "text_encoder", "text_encoder_2", "vae")
    )
    facts["toy"] = bool(toy) or _json(root / MARKER).get("source", {}).get("format") == "toy"
    training = dict(toy.get("training") or {})
    workdir = root.parent if (root.parent / "checkpoints").is_dir() else None
    if workdir is not None:
        step, config = _run(workdir)
        facts["config"] = config or None
        training.setdefault("method", config.get("method"))
        training.setdefault("steps", step)
        teacher = (config.get("teacher") or {}).get("path")
        if teacher and Path(teacher).exists():
            facts["teacher"] = origin(Path(teacher))
        elif teacher:
            facts["teacher"] = {"path": teacher}
        places = (workdir.parent, workdir)
        found = ((d / name for d in places if (d / name).is_file()) for name in FIGURES)
        facts["figures"] = [str(p) for p in (next(f, None) for f in found) if p]
        facts["report"] = next((str(p) for d in places if (p := d / "report.md").is_file()), None)
    facts["method"] = training.get("method") or facts["kind"]
    facts["steps"] = training.get("steps")
    facts["source"] = origin(root)
    return facts


def _metadata(facts: Mapping[str, Any]) -> dict[str, Any]:
    teacher, source = facts.get("teacher") or {}, facts["source"]
    hub = (teacher.get("hub") or source.get("hub") or {}).get("repo_id")
    card = teacher.get("card") or source.get("card") or {}
    out = {"library_name": "diffusers", "pipeline_tag": "text-to-image"}
    if hub:
        out["base_model"] = hub
    out.update({k: card[k] for k in LICENSE_KEYS if card.get(k)})
    out["tags"] = ["distill-jax", "flux", facts["method"].replace("_", "-")]
    return out


def _where(o: Mapping[str, Any]) -> str:
    hub = o.get("hub")
    if hub:
        at = f"`{hub['repo_id']}`" + (f", path `{hub['path']}`" if hub.get("path") else "")
        return f"{at} at commit `{hub['commit']}`"
    return f"`{o.get('path') or o.get('folder')}`"


def _hashes(o: Mapping[str, Any]) -> list[str]:
    lines = [f"  - `{f}`: sha256 `{h}`" for f, h in sorted((o.get("sha256") or {}).items())]
    if not lines and o.get("params"):
        lines = [f"  - parameter checksums (distill-jax), sha256 `{o['params']}`"]
    return lines


def _sampling(facts: Mapping[str, Any]) -> tuple[int, float | None]:
    steps, guidance = SAMPLERS[facts["kind"]]
    return steps, guidance if facts["cfg"].get("guidance_embed") else None


def _base(facts: Mapping[str, Any]) -> str:
    """The diffusers FLUX pipeline whose text encoders and VAE the student samples with: the
    teacher's Hub id, or the diffusers pipeline folder it was converted from."""
    teacher = facts.get("teacher") or {}
    if hub := _metadata(facts).get("base_model"):
        return hub
    path = teacher.get("path")
    if path and (Path(path) / "model_index.json").is_file():
        return path
    return "BASE_FLUX_PIPELINE"


def _code(facts: Mapping[str, Any], dst: Path) -> list[str]:
    kind_ = facts["kind"]
    steps, guidance = _sampling(facts)
    prompt = "a red circle" if facts["toy"] else "a photo of a red fox in the snow"
    teacher = facts.get("teacher") or {}
    base = _base(facts)
    torch_steps = [
        "```python",
        "import torch",
        "from distill_jax.torch_students import FluxStudent, FluxStudentPipeline",
        "",
        f'student = FluxStudent.from_pretrained("{dst}")  # or the Hub id of this folder',
    ]
    if facts["toy"]:
        fn = {"teacher": "euler_sample", "scm": "scm_sample", "meanflow": "meanflow_sample"}
        torch_steps[2] = f"from distill_jax.torch_students import FluxStudent, {fn[kind_]}"
        torch_steps += [
            "# packed noise [B, L, C], image ids [L, 3] and the toy text encoder's embeddings",
            "# (distill-jax's pipe.encode): the toy world has no PyTorch encoder or decoder",
            f"latents = {fn[kind_]}(student, noise, prompt_embeds, pooled_prompt_embeds, img_ids, "
            f"steps={steps}, guidance={guidance})",
            "```",
        ]
    else:
        g = f", guidance_scale={guidance}" if guidance is not None else ""
        torch_steps += [
            "pipe = FluxStudentPipeline.from_pretrained(",
            f'    "{base}", transformer=student, torch_dtype=torch.bfloat16',
            ")  # a diffusers FLUX pipeline: its text encoders, VAE and tokenizers",
            f'image = pipe("{prompt}", num_inference_steps={steps}{g}).images[0]',
            "```",
        ]
    call = f'generate(pipe, ["{prompt}"], method="{kind_}", steps={steps}, guidance={guidance})'
    if facts["pipeline"]:
        jax_steps = [
            "```python",
            "import distill_jax",
            "from distill_jax.pipeline.generate import generate",
            "",
            f'pipe = distill_jax.load_pipeline("{facts["root"]}")',
            f"images = {call}  # uint8 [1, H, W, 3]",
            "```",
        ]
    else:
        pipeline = teacher.get("folder") or "CONVERTED_FLUX_PIPELINE"
        jax_steps = [
            "```bash",
            f"distill-jax convert {dst} student/  # time_scale and heads come from config.json",
            "```",
            "```python",
            "import dataclasses",
            "import distill_jax",
            "from distill_jax.pipeline.generate import generate",
            "",
            f'pipe = distill_jax.load_pipeline("{pipeline}")  # text encoders and VAE',
            'pipe = dataclasses.replace(pipe, transformer=distill_jax.load_flux("student/"))',
            f"images = {call}  # uint8 [1, H, W, 3]",
            "```",
        ]
    return [
        "## Sampling in PyTorch",
        "",
        *torch_steps,
        "",
        "## Sampling in distill-jax",
        "",
        *jax_steps,
    ]


def render(facts: Mapping[str, Any], dst: Path, figures: list[str]) -> str:
    """The card's text; ``figures`` are paths relative to ``dst``."""
    cfg, meta = facts["cfg"], _metadata(facts)
    scale = cfg.get("time_scale")
    rows = [
        ("method", facts["method"]),
        ("trained for", f"{facts['steps']} steps" if facts.get("steps") is not None else "unknown"),
        (
            "time_scale",
            f"{scale:g}: "
            + ("times and guidance enter the embeddings unscaled" if scale == 1 else "stock FLUX"),
        ),
        (
            "structure",
            f"{cfg.get('num_double')} double + {cfg.get('num_single')} single blocks, width "
            f"{cfg.get('num_heads', 0) * cfg.get('head_dim', 0)}, "
            f"{cfg.get('in_channels')} latent channels, guidance embedding "
            f"{'yes' if cfg.get('guidance_embed') else 'no'}",
        ),
        ("sampling", "{} steps, guidance {}".format(*_sampling(facts))),
        ("exported from", f"`{facts['root']}` ({facts.get('dtype')})"),
    ]
    teacher = facts.get("teacher")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    title = TITLES.get(facts["method"], facts["method"])
    lines += [f"# {Path(dst).name}", "", f"A FLUX {title}, exported by distill-jax.", ""]
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if teacher:
        line = f"- teacher: `{teacher.get('folder') or teacher.get('path')}`"
        if teacher.get("hub") or teacher.get("format") not in (None, "toy"):
            line += f", converted from {_where(teacher)} ({teacher.get('format')})"
        lines += [line, *_hashes(teacher)]
    source = facts["source"]
    if source.get("format") not in (None, "toy") or source.get("sha256"):
        lines += [f"- converted from: {_where(source)} ({source.get('format')})", *_hashes(source)]
    lines += ["", *_code(facts, dst), ""]
    if figures or facts.get("report"):
        lines += ["## Evaluation", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in figures]
        if facts.get("report"):
            report = Path(facts["report"]).read_text(encoding="utf-8").splitlines()
            lines += ["", *("##" + line if line.startswith("#") else line for line in report)]
        lines += [""]
    if facts.get("config"):
        lines += [
            "## Training config",
            "",
            "<details><summary>config JSON</summary>",
            "",
            "```json",
            json.dumps(facts["config"], indent=1),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def write(tmp: Path, dst: Path, facts: Mapping[str, Any]) -> Path:
    """``tmp/README.md`` (the folder that becomes ``dst``) and its figures in ``tmp/figures``."""
    figures = []
    for path in facts.get("figures") or []:
        (tmp / "figures").mkdir(exist_ok=True)
        shutil.copyfile(path, tmp / "figures" / Path(path).name)
        figures.append(f"figures/{Path(path).name}")
    card = tmp / "README.md"
    card.write_text(render(facts, Path(dst).absolute(), figures), encoding="utf-8")
    return card


__all__ = ["card_metadata", "describe", "front_matter", "kind", "origin", "render", "write"]
