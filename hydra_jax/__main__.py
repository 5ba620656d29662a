"""`python -m hydra_jax` is the `hydra-jax` command (see hydra_jax.cli)."""

from hydra_jax import cli

cli.main()
