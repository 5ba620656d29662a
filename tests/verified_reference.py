"""The verified losses' reference values, computed by the reference's bound code in PyTorch, stored for CI.

`reference_losses` is the reference trainers' computation (crown-ibp.py, mixtrain.py) on `benchmarks/torch_bounds.py`'s
re-statement of the reference's bound code and `tests/torch_reference.py`'s cnn_tiny: per example, CE of the
worst-case logits -lb (lb = beta CROWN + (1 - beta) IBP lower bound of the margins z_y - z_j over the clipped
eps-ball, 0 at y), the natural CE, and CE of the symbolic-interval worst case ("sym", MixTrain's). It needs torch,
which the test extras do not install: tests/data/verified_reference.json holds its values on the two test problems
(`problem`) at the `CASES` below, so that CI compares against them without torch. Regenerate that file (after a
change to the problems, the cases or the reference code; torch==2.13.0 CPU) with

  PYTHONPATH=. python -m tests.verified_reference

The problems come from numpy draws only (`zoo_helpers.random_variables`), so they do not depend on JAX's RNG; the
file also stores sums of the inputs and parameters, and the tests check them before comparing.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from hydra_jax import models
from tests import zoo_helpers

FIXTURE = pathlib.Path(__file__).parent / "data" / "verified_reference.json"
PROBLEMS = {"crown": {"batch": 4, "seed": 0}, "mixtrain": {"batch": 4, "seed": 1}}
CASES = {  # name: (problem, eps, beta)
  "crown_start0": ("crown", 0.005, 0.75),  # crown_ibp eps 0.02, starting_epsilon 0, L 3, epoch 0.5
  "crown_start004": ("crown", 0.008, 0.6),  # crown_ibp eps 0.02, starting_epsilon 0.004, L 3, epoch 0.5
  "ibp_start004": ("crown", 0.008, 0.0),  # ibp, the same schedule
  "mixtrain": ("mixtrain", 0.01, 0.0),  # mixtrain eps 0.01 after its ramp (sym only; beta unused)
}


def problem(name):
  """(apply_fn, variables, batch) of cnn_tiny on `PROBLEMS[name]`: random [0, 1] images and labels in 0..9."""
  spec = PROBLEMS[name]
  model, x, variables = zoo_helpers.random_variables("cnn_tiny", batch=spec["batch"], seed=spec["seed"])
  y = jnp.asarray(np.random.default_rng(spec["seed"]).integers(0, 10, spec["batch"]))
  return models.make_apply_fn(model), variables, {"image": x, "label": y}


def checksums(variables, batch):
  """Sums of the images and of every parameter (float64): what identifies a problem in the stored file."""
  total = sum(float(np.sum(np.asarray(w, np.float64))) for w in jax.tree.leaves(variables["params"]))
  return {"image_sum": float(np.sum(np.asarray(batch["image"], np.float64))), "param_sum": total}


def reference_losses(variables, batch, eps, beta):
  """Per-example {'robust', 'natural', 'sym'} CE lists of the reference trainers' computation in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top

  from benchmarks import torch_bounds  # pylint: disable=g-import-not-at-top
  from hydra_jax import convert  # pylint: disable=g-import-not-at-top
  from tests import torch_reference  # pylint: disable=g-import-not-at-top

  seq = torch_reference.build("cnn_tiny", 10)
  seq.load_state_dict(convert.to_torch_state_dict(variables, model_name="cnn_tiny", as_torch=True))
  x = torch.from_numpy(np.asarray(batch["image"]).transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(np.asarray(batch["label"]).astype(np.int64))
  eye = torch.eye(10)
  c = (eye[y].unsqueeze(1) - eye.unsqueeze(0))[y.unsqueeze(1) != torch.arange(10).unsqueeze(0)].view(-1, 9, 10)
  lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
  ce = torch.nn.CrossEntropyLoss(reduction="none")
  with torch.no_grad():
    _, ilb, _ = torch_bounds.interval_range(seq, lo, hi, c)
    clb = torch_bounds.backward_range(seq, lo, hi, c)
    lb = clb * beta + ilb * (1 - beta)
    others = torch.tensor([[j for j in range(10) if j != t] for t in y.tolist()])
    robust = ce(-torch.zeros(len(y), 10).scatter(1, others, lb), y)
    natural = ce(seq(x), y)
    sym = ce(torch_bounds.sym_worst_case(seq, lo, hi, y, 10), y)
  return {name: value.tolist() for name, value in (("robust", robust), ("natural", natural), ("sym", sym))}


def main():
  import torch  # pylint: disable=g-import-not-at-top

  stored = {"torch": torch.__version__, "problems": {}, "cases": {}}
  for name, spec in PROBLEMS.items():
    _, variables, batch = problem(name)
    stored["problems"][name] = {**spec, **checksums(variables, batch)}
  for case, (name, eps, beta) in CASES.items():
    _, variables, batch = problem(name)
    stored["cases"][case] = {"problem": name, "eps": eps, "beta": beta, **reference_losses(variables, batch, eps, beta)}
  FIXTURE.parent.mkdir(exist_ok=True)
  FIXTURE.write_text(json.dumps(stored, indent=1) + "\n")
  print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes, torch {torch.__version__})")


if __name__ == "__main__":
  main()
