"""GenEval's generation layout from a toy pipeline: the exact folders, and resuming without redoing
finished prompts."""

import json

import numpy as np
import pytest
from PIL import Image

from distill_jax import evaluate as ev
from distill_jax.pipeline import toy

ROWS = [
    {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "prompt": "a red circle",
    },
    {"tag": "counting", "include": [{"class": "square", "count": 2}], "prompt": "two blue squares"},
    {"tag": "position", "prompt": "a green triangle left of a cyan circle"},
]


@pytest.fixture
def toy_folder():
    return toy.TEACHER_PATH  # the shipped toy teacher


@pytest.fixture
def metadata(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_layout_and_resume(toy_folder, metadata, tmp_path):
    out = tmp_path / "geneval"
    kw = dict(method="teacher", steps=1, guidance=None, size=32)
    first = ev.generate_geneval(toy_folder, metadata, out, **kw)
    assert first["generated"] == 3 and first["skipped"] == 0
    want = []
    for i in range(3):
        want += [f"{i:05d}", f"{i:05d}/metadata.jsonl", f"{i:05d}/samples"]
        want += [f"{i:05d}/samples/{j:04d}.png" for j in range(4)]
    assert _tree(out) == sorted(want)
    for i, row in enumerate(ROWS):
        lines = (out / f"{i:05d}" / "metadata.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [row]
        image = Image.open(out / f"{i:05d}" / "samples" / "0000.png")
        assert image.size == (32, 32) and image.mode == "RGB"
    pixels = {
        i: np.stack([np.asarray(Image.open(p)) for p in sorted((out / f"{i:05d}").rglob("*.png"))])
        for i in range(3)
    }
    assert len({im.tobytes() for im in pixels[0]}) == 4  # four different samples

    # An interruption: prompt 1 never finished (a partial folder left), prompt 2 never started.
    kept = {p: p.stat().st_mtime_ns for p in (out / "00000").rglob("*")}
    (out / "00001").rename(out / ".00001.partial")
    for p in (out / "00002").rglob("*.png"):
        p.unlink()
    (out / "00002" / "samples").rmdir()
    (out / "00002" / "metadata.jsonl").unlink()
    (out / "00002").rmdir()
    again = ev.generate_geneval(toy_folder, metadata, out, **kw)
    assert again["generated"] == 2 and again["skipped"] == 1
    assert _tree(out) == sorted(want)
    assert {p: p.stat().st_mtime_ns for p in (out / "00000").rglob("*")} == kept
    for i in (1, 2):  # the noise of prompt i depends on i alone: the same images as before
        redone = sorted((out / f"{i:05d}").rglob("*.png"))
        np.testing.assert_array_equal(
            np.stack([np.asarray(Image.open(p)) for p in redone]), pixels[i]
        )
    done = ev.generate_geneval(toy_folder, metadata, out, **kw)
    assert done["generated"] == 0 and done["skipped"] == 3


def test_bad_metadata_is_named(toy_folder, tmp_path):
    bad = tmp_path / "meta.jsonl"
    bad.write_text(json.dumps({"tag": "single_object"}) + "\n")
    with pytest.raises(ValueError, match=r"meta.jsonl:1: .*'prompt'"):
        ev.generate_geneval(toy_folder, bad, tmp_path / "out", guidance=None)
    bad.write_text(json.dumps({"prompt": "a photo of a bench"}) + "\n")
    with pytest.raises(ValueError, match="unknown word"):  # the toy knows only its own words
        ev.generate_geneval(toy_folder, bad, tmp_path / "out", steps=1, guidance=None, size=32)
    with pytest.raises(ValueError, match="guidance=None"):
        ev.generate_geneval(toy_folder, bad, tmp_path / "out2", steps=1, guidance=3.5, size=32)
