"""hydra_jax: HYDRA (Sehwag et al., NeurIPS 2020) pruning of robust networks in JAX/Flax.

The sparsity parameter `k` is everywhere the fraction of weights KEPT (k=0.01 is 99% pruning).
"""

from typing import Any

__version__ = "0.1.0"

# A nested structure of arrays (dicts, lists, tuples, dataclasses, None): the one alias every module uses.
PyTree = Any
