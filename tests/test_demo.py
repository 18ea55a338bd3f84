"""The embedded default end to end: a shortened demo distils the shipped teacher with sCM and
MeanFlow through the real trainer and writes a well-formed, re-scorable report."""

import json

import numpy as np
import pytest
from PIL import Image

from distill_jax import demo
from distill_jax import evaluate as ev
from distill_jax.data import shapes
from distill_jax.folders import load_pipeline
from distill_jax.pipeline.toy import ToyPipeline


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    report = demo.run_demo(workdir, quick=True)
    return workdir, report


def test_report_schema(report_dir):
    workdir, report = report_dir
    assert json.loads((workdir / "report.json").read_text()) == json.loads(json.dumps(report))
    full = report["teacher"]["full_steps"]
    want = [("teacher", n) for n in demo.teacher_steps(full)]
    assert demo.teacher_steps(16) == [1, 2, 4, 8, 16] and demo.teacher_steps(12) == [1, 2, 4, 8, 12]
    want += [(m, n) for m in demo.METHODS for n in demo.STUDENT_STEPS]
    assert [(r["model"], r["steps"]) for r in report["results"]] == want
    n = report["prompts"]["count"]
    assert n == demo.QUICK["num_prompts"]
    for row in report["results"]:
        assert set(row["accuracy"]) == {*ev.ATTRIBUTES, "by_tag"}
        for a in ev.ATTRIBUTES:
            assert 0.0 <= row["accuracy"][a] <= 1.0
        assert row["seconds_per_image"] > 0 and len(row["samples"]) == n
        assert row["background_noise"] >= 0
    assert set(report["training"]) == set(demo.METHODS)
    for t in report["training"].values():
        assert t["steps"] == demo.QUICK["train_steps"] and np.isfinite(t["final_loss"])
    assert set(report["targets"]) == {f"{m}_{s}_step" for m, s in demo.TARGETS}
    students = {f"{m}_{s}_step" for m in demo.METHODS for s in demo.STUDENT_STEPS}
    assert set(report["clean_samples"]) == students
    table = (workdir / "report.md").read_text()
    assert table.count("\n| teacher |") == len(want) - 6 and "| scm | 1 |" in table
    grid = Image.open(workdir / "samples.png")
    assert grid.width > demo.QUICK["grid_prompts"] * shapes.SIZE
    plot = Image.open(workdir / "accuracy.png")
    assert plot.format == "PNG" and plot.size == (640, 420)
    plot.load()  # decodes: a whole, valid PNG


def test_every_sample_can_be_rescored(report_dir):
    """Images on disk, prompts and attributes in the report: the evaluator gives back the
    stored scores and accuracies."""
    workdir, report = report_dir
    for row in report["results"]:
        prompts = [shapes.Prompt.from_json(s["attributes"]) for s in row["samples"]]
        assert [p.text for p in prompts] == [s["prompt"] for s in row["samples"]]
        images = np.stack([np.asarray(Image.open(workdir / s["image"])) for s in row["samples"]])
        assert images.shape[1:] == (shapes.SIZE, shapes.SIZE, 3)
        summary, scores = ev.evaluate_images(images, prompts)
        assert scores == [s["scores"] for s in row["samples"]]
        assert summary == row["accuracy"]


def test_students_are_saved_and_reload(report_dir):
    workdir, _ = report_dir
    for method in demo.METHODS:
        student = load_pipeline(workdir / method / "student")
        assert isinstance(student, ToyPipeline)
        assert (student.transformer.delta_in is not None) == (method == "meanflow")
        assert (student.transformer.logvar is not None) == (method == "scm")
