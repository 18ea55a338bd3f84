"""The quickstart notebook's toy part executes on CPU (a few training steps)."""

import json
from pathlib import Path

import numpy as np

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch, tmp_path):
    """Runs the code cells in order in one namespace, as a kernel would (nbclient is not a
    dependency), with ``SMALL = True``; the FLUX cells stay off (``REAL_FLUX = False``)."""
    monkeypatch.chdir(tmp_path)
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    switches = [i for i, src in enumerate(cells) if "SMALL = False" in src]
    assert len(switches) == 1 and "REAL_FLUX = False" in cells[switches[0]]
    cells[switches[0]] = cells[switches[0]].replace("SMALL = False", "SMALL = True")
    namespace: dict = {"__name__": "__main__"}
    for i, src in enumerate(cells):
        exec(compile(src, f"{NOTEBOOK.name}[code cell {i}]", "exec"), namespace)
    assert not namespace["REAL_FLUX"] and "pipe" not in namespace  # the FLUX cells did nothing
    assert namespace["run"].metrics[-1]["step"] == 4
    for name in ("teacher_full", "teacher_one", "student_one", "student_two"):
        images = namespace[name]
        assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
