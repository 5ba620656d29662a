"""Command line: `hydra-jax {train,eval,export,certify} --config FILE[:ARG] [--config.KEY=VALUE ...] --workdir DIR`.

  hydra-jax train  --config configs/digits_demo.py --workdir runs/demo
  hydra-jax train  --config configs/adversarial.py:model=wrn_28_4 --config.stage=prune --config.k=0.01 \
                   --config.source=runs/pretrain --workdir runs/prune
  hydra-jax eval   --config configs/adversarial.py:model=wrn_28_4 --workdir runs/finetune \
                   --methods=pgd_linf,apgd_ce,apgd_dlr,apgd_t
  hydra-jax export --config configs/adversarial.py:model=wrn_28_4 --workdir runs/finetune --out model.npz
  hydra-jax certify --config configs/adversarial.py:model=wrn_28_4,objective=smooth --workdir runs/smooth \
                   --sigma=0.25 --n=100000 --skip=20 --out=runs/smooth/certify

The config is locked: an unknown `--config.KEY` is rejected with the key's name, and `train` checks values
(`train.check_config`). The commands only parse flags and call the library (`train.train_and_evaluate`,
`export.evaluate_checkpoint`, `export.export_checkpoint`, `export.certify_checkpoint`); `python -m hydra_jax`
is the same program.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from hydra_jax import export
from hydra_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':ARG'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (train: created or resumed; eval/export: read).")
_METHODS = flags.DEFINE_list("methods", ["pgd_linf", "apgd_ce", "apgd_dlr"],
                             "eval: attacks to run; robust accuracy is the per-example worst case over them.")
_OUT = flags.DEFINE_string("out", None, "export: output file (.npz for numpy, .pth for a PyTorch state dict); "
                           "certify: output directory (default WORKDIR/certify_sigma<SIGMA>).")
_DENSE = flags.DEFINE_bool("dense", True, "export: masked dense weights (zeros) instead of weights + scores.")
_SIGMA = flags.DEFINE_float("sigma", 0.25, "certify: smoothing noise std (pixels in [0, 1]).")
_N0 = flags.DEFINE_integer("n0", 100, "certify: Monte Carlo samples to select the class.")
_N = flags.DEFINE_integer("n", 100_000, "certify: Monte Carlo samples to estimate its probability.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "certify: failure probability of each certificate.")
_SKIP = flags.DEFINE_integer("skip", 1, "certify: every skip-th eval example.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "certify: at most this many examples (0: all).")
_CERTIFY_BATCH = flags.DEFINE_integer("certify_batch", 1000, "certify: noise samples per forward pass.")

COMMANDS = ("train", "eval", "export", "certify")


def _run(command: str) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  if command == "train":
    result = train.train_and_evaluate(config, workdir)
    if isinstance(result, list):
      print(train.summary_table(result))
    else:
      print(json.dumps(result, indent=2))
  elif command == "eval":
    print(json.dumps(export.evaluate_checkpoint(config, workdir, methods=_METHODS.value), indent=2))
  elif command == "certify":
    out_dir = _OUT.value or os.path.join(workdir, f"certify_sigma{_SIGMA.value}")
    print(export.certify_checkpoint(config, workdir, out_dir, sigma=_SIGMA.value, n0=_N0.value, n=_N.value,
                                    alpha=_ALPHA.value, batch_size=_CERTIFY_BATCH.value, skip=_SKIP.value,
                                    max_examples=_MAX_EXAMPLES.value)["table"])
  else:
    if not _OUT.value:
      raise app.UsageError("export needs --out FILE (.npz or .pth)")
    print(export.export_checkpoint(config, workdir, _OUT.value, dense=_DENSE.value))


def main(argv: list[str] | None = None) -> None:
  """Entry point of the `hydra-jax` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f"usage: hydra-jax {{{','.join(COMMANDS)}}} --config FILE[:ARG] --workdir DIR [flags]\n\n{__doc__}",
          file=sys.stderr)
    sys.exit(2)
  command = argv.pop(1)
  if "JAX_THREEFRY_PARTITIONABLE" not in os.environ:
    # The partitionable threefry compiles each random op for seconds on CPU; every random draw of a run
    # happens per device (inside shard_map/pmap), so partitionability buys nothing here.
    jax.config.update("jax_threefry_partitionable", False)
  try:
    app.run(lambda _: _run(command), argv=argv)
  except (KeyError, ValueError, FloatingPointError) as error:  # bad config keys / values, corrupt or
    message = error.args[0] if isinstance(error, KeyError) and error.args else error  # mismatched checkpoints
    print(f"hydra-jax {command}: error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
