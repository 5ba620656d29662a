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
(`config.check_config`). The commands only parse flags and call the library (`pipeline.train_and_evaluate`,
`export.evaluate_checkpoint`, `export.export_checkpoint`, `export.certify_checkpoint`); `python -m hydra_jax`
is the same program. A user error (`errors.UserError`: config, data, checkpoint; or a diverged run) prints one
line naming the problem and the fix and exits with status 1, writing nothing; `HYDRA_JAX_TRACEBACK=1` or
`--verbosity` shows its traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hydra_jax import errors
from hydra_jax import export
from hydra_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':ARG'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (train: created or resumed; eval/export: read).")
_METHODS = flags.DEFINE_list(
  "methods",
  None,
  "eval: methods to run (default: the config's eval.methods); robust accuracy is the per-example worst case over them.",
)
_OUT = flags.DEFINE_string(
  "out",
  None,
  "export: output file (.npz for numpy, .pth for a PyTorch state dict); "
  "certify: output directory (default WORKDIR/certify_sigma<SIGMA>).",
)
_DENSE = flags.DEFINE_bool("dense", True, "export: masked dense weights (zeros) instead of weights + scores.")
_SIGMA = flags.DEFINE_float("sigma", 0.25, "certify: smoothing noise std (pixels in [0, 1]).")
_N0 = flags.DEFINE_integer("n0", 100, "certify: Monte Carlo samples to select the class.")
_N = flags.DEFINE_integer("n", 100_000, "certify: Monte Carlo samples to estimate its probability.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "certify: failure probability of each certificate.")
_SKIP = flags.DEFINE_integer("skip", 1, "certify: every skip-th eval example.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "certify: at most this many examples (0: all).")
_CERTIFY_BATCH = flags.DEFINE_integer("certify_batch", 1000, "certify: noise samples per forward pass.")

COMMANDS = ("train", "eval", "export", "certify")
TRACEBACK_ENV = "HYDRA_JAX_TRACEBACK"  # set to 1 to see the traceback of a user error


def _run(command: str) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  if command == "train":
    result = pipeline.train_and_evaluate(config, workdir)
    if isinstance(result, list):
      print(pipeline.summary_table(result))
    else:
      print(json.dumps(result, indent=2))
  elif command == "eval":
    print(json.dumps(export.evaluate_checkpoint(config, workdir, methods=_METHODS.value), indent=2))
  elif command == "certify":
    out_dir = _OUT.value or os.path.join(workdir, f"certify_sigma{_SIGMA.value}")
    print(
      export.certify_checkpoint(
        config,
        workdir,
        out_dir,
        sigma=_SIGMA.value,
        n0=_N0.value,
        n=_N.value,
        alpha=_ALPHA.value,
        batch_size=_CERTIFY_BATCH.value,
        skip=_SKIP.value,
        max_examples=_MAX_EXAMPLES.value,
      )["table"]
    )
  else:
    if not _OUT.value:
      raise app.UsageError("export needs --out FILE (.npz or .pth)")
    print(export.export_checkpoint(config, workdir, _OUT.value, dense=_DENSE.value))


def _show_tracebacks(argv: list[str]) -> bool:
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or any(a.startswith("--verbosity") for a in argv)


def _fail(command: str, message: str) -> None:
  print(f"hydra-jax {command}: error: {message}\n(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
  sys.exit(1)


def _parse_flags(command: str, argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.KEY` or a bad flag value reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:  # ml_collections: an override of a key the config lacks
    key = str(error.args[0] if error.args else error).strip("'\"")
    given = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if not given or _show_tracebacks(argv):
      raise  # not an override's key: an error inside the config file keeps its traceback
    _fail(
      command,
      f"{', '.join(given)}: the config has no key '{key}'; the keys are listed in "
      f"hydra_jax/config.py (default_config) and the config file",
    )
  except flags.Error as error:
    if _show_tracebacks(argv):
      raise
    _fail(command, str(error))


def main(argv: list[str] | None = None) -> None:
  """Entry point of the `hydra-jax` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(
      f"usage: hydra-jax {{{','.join(COMMANDS)}}} --config FILE[:ARG] --workdir DIR [flags]\n\n{__doc__}",
      file=sys.stderr,
    )
    sys.exit(2)
  command = argv.pop(1)
  try:
    app.run(lambda _: _run(command), argv=argv, flags_parser=lambda args: _parse_flags(command, args))
  except (errors.UserError, FloatingPointError, TimeoutError) as error:  # bad input; a diverged run; peers absent
    if _show_tracebacks(argv):
      raise
    _fail(command, str(error))


if __name__ == "__main__":
  main()
