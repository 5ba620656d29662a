"""hydra_jax: HYDRA (Sehwag et al., NeurIPS 2020) pruning of robust networks in JAX/Flax.

The sparsity parameter `k` is everywhere the fraction of weights KEPT (k=0.01 is 99% pruning).

  import hydra_jax
  model = hydra_jax.load_run("runs/digits_demo/k0.05/finetune")   # latest checkpoint; "best" or a step
  logits = model(images)                                          # [N, H, W, C] in [0, 1] -> [N, classes]
  config = hydra_jax.load_config("configs/adversarial.py:model=wrn_28_4")   # as --config FILE[:ARG]

`load_run` (`export.load_run`) and `load_config` (`config.load_config`) are imported on first use, so that
`import hydra_jax` stays cheap.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# A nested structure of arrays (dicts, lists, tuples, dataclasses, None): the one alias every module uses.
PyTree = Any

_LAZY = {"load_run": "hydra_jax.export", "load_config": "hydra_jax.config"}


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'hydra_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted([*globals(), *_LAZY])
