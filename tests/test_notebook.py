"""notebooks/quickstart.ipynb executed at its tiny size with nbclient, its printed results checked.

Run: python -m pytest -q tests/test_notebook.py
"""

import math
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
K = 0.1


def _tiny(notebook, workdir):
  """The notebook with its parameter cell set to TINY = True and a run directory under `workdir`."""
  cell = next(c for c in notebook.cells if c.cell_type == "code" and "TINY = False" in c.source)
  cell.source = cell.source.replace("TINY = False", "TINY = True")
  cell.source = re.sub(r'WORKDIR = "[^"]*"', f"WORKDIR = {workdir!r}", cell.source)
  assert f"K = {K}" in cell.source
  return notebook


def _text(cell):
  return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  notebook = _tiny(nbformat.read(NOTEBOOK, as_version=4), str(tmp_path_factory.mktemp("quickstart")))
  NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  return [_text(c) for c in notebook.cells if c.cell_type == "code"], notebook


def _cell_printing(texts, marker):
  return next(t for t in texts if marker in t)


def test_every_layer_keeps_the_reference_count_of_weights(executed):
  texts, _ = executed
  table = _cell_printing(texts, "kept fraction:")
  rows = [line.split() for line in table.splitlines()[1:] if line and not line.startswith(("TOTAL", "kept"))]
  assert len(rows) == 4  # cnn_tiny: two convolutions, two dense layers
  for _, kept, total, _ in rows:
    n = int(total.replace(",", ""))
    assert int(kept.replace(",", "")) == n - int((1 - K) * n)
  kept_fraction = float(re.search(r"kept fraction: ([0-9.]+)", table).group(1))
  assert kept_fraction == pytest.approx(K, abs=0.02)


def test_ablation_plots_a_finite_loss_curve_per_init(executed):
  texts, notebook = executed
  losses = dict(
    re.findall(r"^(\w+)\s+final prune loss ([-0-9.naif]+)$", _cell_printing(texts, "final prune loss"), re.M)
  )
  assert set(losses) == {"scaled", "kaiming_normal"}
  assert all(math.isfinite(float(v)) for v in losses.values())
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs)


def test_robust_accuracy_is_the_worst_case_of_the_attacks(executed):
  texts, _ = executed
  values = dict(re.findall(r"^(\w+)\s+([0-9.]+)$", _cell_printing(texts, "apgd_dlr"), re.M))
  accuracies = {name: float(values[name]) for name in ("clean", "pgd_linf", "apgd_ce", "apgd_dlr", "robust")}
  assert all(0.0 <= a <= 1.0 for a in accuracies.values())
  assert accuracies["robust"] <= min(accuracies["pgd_linf"], accuracies["apgd_ce"], accuracies["apgd_dlr"])
  assert all(accuracies[m] <= accuracies["clean"] + 1e-9 for m in ("pgd_linf", "apgd_ce", "apgd_dlr"))
  assert int(values["examples"]) == 32
  # As counts of the 32 examples (printed to 4 decimals): an example is robust when classified correctly clean and
  # under every attack, and an attack's correct examples are clean-correct ones, so each attack removes at most
  # clean - attack of them: robust >= clean - sum over the attacks of (clean - attack).
  counts = {name: round(32 * a) for name, a in accuracies.items()}
  assert all(abs(32 * a - counts[name]) < 0.01 for name, a in accuracies.items())
  lost = sum(counts["clean"] - counts[m] for m in ("pgd_linf", "apgd_ce", "apgd_dlr"))
  assert counts["robust"] >= counts["clean"] - lost
