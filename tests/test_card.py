"""The model card ``export`` writes: Hub front matter that parses, and what a reader needs.

The student is exported from a training run's layout (``WORKDIR/student`` beside
``WORKDIR/checkpoints/<step>/config/metadata``, the demo's figures one level up), its teacher a
folder converted from a diffusers checkpoint whose own card carries a licence.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from PIL import Image
from test_flux import torch_flux

from distill_jax import card
from distill_jax.convert import convert, export
from distill_jax.folders import save_model
from distill_jax.models.flux import Flux, FluxConfig

LICENSE = {"license": "other", "license_name": "flux-1-dev-non-commercial-license"}
STEPS = 120


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(training workdir, teacher folder): a finished sCM run in a demo-like folder."""
    from flax import nnx

    root = tmp_path_factory.mktemp("card")
    cfg = FluxConfig.tiny()
    src = root / "teacher_src"
    torch_flux(cfg).save_pretrained(src)
    (src / "README.md").write_text("---\n" + yaml.safe_dump(LICENSE) + "---\n# Teacher\n")
    teacher = convert(src, root / "teacher", progress=False, time_scale=1.0)
    workdir = root / "demo" / "scm"
    student = Flux(cfg.replace(time_scale=1.0, logvar_head=True), rngs=nnx.Rngs(0))
    save_model(student, workdir / "student")
    config = {"method": "scm", "teacher": {"path": str(teacher)}, "optim": {"lr": 1e-5}}
    for step in (60, STEPS):
        (workdir / "checkpoints" / str(step) / "config").mkdir(parents=True)
        (workdir / "checkpoints" / str(step) / "config" / "metadata").write_text(
            json.dumps({**config, "total_steps": step})
        )
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "demo" / "samples.png")
    (root / "demo" / "report.md").write_text("# Toy distillation demo\n\n| model | acc |\n")
    return workdir, teacher


def test_card_of_a_training_run(run, tmp_path):
    workdir, teacher = run
    out = export(workdir / "student", tmp_path / "hf", progress=False)
    text = (out / "README.md").read_text()
    meta = card.front_matter(text)
    assert meta == {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        **LICENSE,
        "tags": ["distill-jax", "flux", "scm"],
    }
    assert yaml.safe_load(text.split("---")[1]) == meta  # plain YAML, as the Hub reads it
    assert f"| trained for | {STEPS} steps |" in text
    assert "| time_scale | 1: times and guidance enter the embeddings unscaled |" in text
    assert f"teacher: `{teacher.resolve()}`" in text
    sha = json.loads((teacher / "transformer" / "config.json").read_text())["source"]["sha256"]
    assert all(h in text for h in sha.values())
    config = re.search(r"```json\n(.*?)\n```", text, re.S).group(1)
    assert json.loads(config)["total_steps"] == STEPS  # the newest step's config
    assert (out / "figures" / "samples.png").is_file() and "](figures/samples.png)" in text
    assert "### Toy distillation demo" in text  # the demo's report, one level down
    assert f'FluxStudent.from_pretrained("{out.absolute()}")' in text
    assert f'load_pipeline("{teacher.resolve()}")' in text
    assert 'method="scm", steps=2, guidance=4.5' in text
    extra = json.loads((out / "config.json").read_text())["_distill_jax"]
    assert extra["method"] == "scm" and extra["time_scale"] == 1.0


def test_card_code_names_what_exists():
    """The names the card's code imports exist where it imports them from."""
    import distill_jax
    from distill_jax.pipeline import generate
    from distill_jax.torch_students import FluxStudent, FluxStudentPipeline

    assert callable(generate.generate) and distill_jax.load_pipeline and distill_jax.load_flux
    assert FluxStudent.from_pretrained and FluxStudentPipeline.from_pretrained


def test_card_of_a_bare_student_and_bad_cards(tmp_path):
    """A student with no run around it still gets a valid card; a teacher card whose front
    matter is not YAML carries no licence rather than failing the conversion."""
    cfg = FluxConfig.tiny().replace(time_scale=1.0, delta_embed=True)
    from flax import nnx

    path = save_model(Flux(cfg, rngs=nnx.Rngs(0)), tmp_path / "student")
    text = (export(path, tmp_path / "hf", progress=False) / "README.md").read_text()
    meta = card.front_matter(text)
    assert meta["tags"][-1] == "meanflow" and "license" not in meta and "base_model" not in meta
    assert "| trained for | unknown |" in text and 'method="meanflow", steps=4' in text
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert card.card_metadata(tmp_path) == {}
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert card.card_metadata(tmp_path) == {}
