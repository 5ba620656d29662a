"""Command line: `hydra-jax {train,eval,export} --config FILE[:ARG] [--config.KEY=VALUE ...] --workdir DIR`.

  hydra-jax train  --config configs/digits_demo.py --workdir runs/demo
  hydra-jax train  --config configs/adversarial.py:model=wrn_28_4 --config.stage=prune --config.k=0.01 \
                   --config.source=runs/pretrain --workdir runs/prune
  hydra-jax eval   --config configs/adversarial.py:model=wrn_28_4 --workdir runs/finetune \
                   --methods=pgd_linf,apgd_ce,apgd_dlr,apgd_t
  hydra-jax export --config configs/adversarial.py:model=wrn_28_4 --workdir runs/finetune --out model.npz

The config is locked: an unknown `--config.KEY` is rejected with the key's name, and `train` checks values
(`train.check_config`). The commands only parse flags and call the library (`train.train_and_evaluate`,
`export.evaluate_checkpoint`, `export.export_checkpoint`); `python -m hydra_jax` is the same program.
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
_OUT = flags.DEFINE_string("out", None, "export: output file (.npz for numpy, .pth for a PyTorch state dict).")
_DENSE = flags.DEFINE_bool("dense", True, "export: masked dense weights (zeros) instead of weights + scores.")

COMMANDS = ("train", "eval", "export")


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
  except (KeyError, ValueError, FloatingPointError, TimeoutError) as error:  # bad config keys / values, corrupt or
    message = error.args[0] if isinstance(error, KeyError) and error.args else error  # mismatched checkpoints
    print(f"hydra-jax {command}: error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
