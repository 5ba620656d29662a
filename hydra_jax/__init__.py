"""hydra_jax: HYDRA (Sehwag et al., NeurIPS 2020) pruning of robust networks in JAX/Flax.

The sparsity parameter `k` is everywhere the fraction of weights KEPT (k=0.01 is 99% pruning).
"""

__version__ = "0.1.0"
