"""Command line: `hydra-jax {train,eval,export,certify} --config FILE[:ARG] [--config.KEY=VALUE ...] --workdir DIR`.

`hydra-jax COMMAND --help` lists the command's own flags; `hydra-jax --help` prints this overview. eval, export
and certify default to the config stored with the run (`--workdir` alone).

  hydra-jax train  --config configs/digits_demo.py --workdir runs/demo
  hydra-jax train  --config configs/adversarial.py:model=wrn_28_4 --config.stage=prune --config.k=0.01 \
                   --config.source=runs/pretrain --workdir runs/prune
  hydra-jax eval   --workdir runs/finetune --methods=pgd_linf,apgd_ce,apgd_dlr,apgd_t --per_example=examples.csv
  hydra-jax export --config configs/adversarial.py:model=wrn_28_4 --workdir runs/finetune --out model.npz
  hydra-jax export --workdir runs/channels/k0.5/finetune --compact --out small.npz   # a mask.granularity=channel run
  hydra-jax certify --config configs/adversarial.py:model=wrn_28_4,objective=smooth --workdir runs/smooth \
                   --sigma=0.25 --n=100000 --skip=20 --out=runs/smooth/certify

The config file is read by `config.load_config` (its names and numbers checked), the config is locked (an
unknown `--config.KEY` is rejected with the key's name), and `train` checks every value (`config.check_config`).
The commands only parse flags and call the library (`pipeline.train_and_evaluate`, `export.evaluate_checkpoint`,
`export.export_checkpoint`, `export.certify_checkpoint`); `python -m hydra_jax` is the same program. Bad input
(`errors.UserError`: a command, flag, config, path, data or checkpoint; a method the model does not support,
`NotImplementedError`; or a diverged run) prints one line naming
the problem and the fix and exits with status 1 (2 for an unknown command), before any work where it is the
input's; `HYDRA_JAX_TRACEBACK=1` or `--verbosity` shows its traceback. Any other exception is a bug and keeps its
traceback. docs/failures.md lists each failure and what it keeps.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import textwrap

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hydra_jax import config as config_lib
from hydra_jax import errors
from hydra_jax import export
from hydra_jax import paths
from hydra_jax import pipeline
from hydra_jax import preemption

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A config file: FILE's get_config(ARG) (ARG: the text after ':'), e.g. configs/adversarial.py:model=wrn_28_4.",
  lock_config=True,
)


class _ConfigFileParser(flags.ArgumentParser):
  """`--config FILE[:ARG]` read by `config.load_config`, as from Python: a missing or unparsable file, an invalid
  ARG or value is a one-line ConfigError at once (ml_collections' own parser defers a missing file to the
  config's first use and wraps other errors in a traceback)."""

  def parse(self, spec: str) -> ml_collections.ConfigDict:
    return config_lib.load_config(spec)

  def flag_type(self) -> str:
    return "config object"


flags.FLAGS["config"].parser = _ConfigFileParser()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (train: created or resumed; the others: read).")
_METHODS = flags.DEFINE_list(
  "methods",
  None,
  "Evaluation methods to run (default: the config's eval.methods); robust accuracy is the per-example worst "
  "case over them.",
)
_PER_EXAMPLE = flags.DEFINE_string(
  "per_example",
  None,
  "Also write, per test example, its index, label, clean correctness, each method's and the worst cases, "
  "to FILE (.npz or .csv).",
)
_CURVE = flags.DEFINE_string(
  "curve",
  None,
  "eval: instead of --methods, write the security curve (robust accuracy against eps from FMN's smallest "
  "adversarial norms, at the run's eval.norm, eps from 0 to twice eval.eps) to FILE (.png), with FILE's "
  ".csv and .json beside it.",
)
_CURVE_RUNS = flags.DEFINE_list(
  "curve_runs", None, "eval --curve: more run directories drawn on the same axes (e.g. the LWM branch at this k)."
)
_OUT = flags.DEFINE_string(
  "out",
  None,
  "export: output file (.npz for numpy, .pth for a PyTorch state dict); "
  "certify: output directory (default WORKDIR/certify_sigma<SIGMA>).",
)
_COMPACT = flags.DEFINE_bool(
  "compact",
  False,
  "Use the compact network of a mask.granularity=channel run (only its kept channels): export writes it as "
  ".npz with its channel plan, eval evaluates it.",
)
_BEST = flags.DEFINE_bool(
  "best", False, "Read the run's best checkpoint (best/: its highest robust accuracy) instead of its latest."
)
_DENSE = flags.DEFINE_bool("dense", True, "Masked dense weights (zeros) instead of weights + scores.")
_SIGMA = flags.DEFINE_float("sigma", 0.25, "Smoothing noise std (pixels in [0, 1]).")
_N0 = flags.DEFINE_integer("n0", 100, "Monte Carlo samples to select the class.")
_N = flags.DEFINE_integer("n", 100_000, "Monte Carlo samples to estimate its probability.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_SKIP = flags.DEFINE_integer("skip", 1, "Certify every skip-th eval example.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Certify at most this many examples (0: all).")
_CERTIFY_BATCH = flags.DEFINE_integer("certify_batch", 1000, "Noise samples per forward pass.")

COMMANDS = ("train", "eval", "export", "certify")
TRACEBACK_ENV = "HYDRA_JAX_TRACEBACK"  # set to 1 to see the traceback of a user error

_RUN_CONFIG_HELP = "A config file (FILE[:ARG], see below); default: the run's own, stored with its checkpoint."
# Per command: what it does, and its flags with their help there (None: the flag's own).
_COMMAND_HELP = {
  "train": (
    "Runs config.stage (pretrain, prune, finetune, str, admm, rigl; 'all': pretrain, then per k prune, finetune "
    "and the baselines) in DIR and prints its summary; rerunning the command resumes the run.",
    {"config": None, "workdir": "Run directory, created or resumed."},
  ),
  "eval": (
    "Evaluates the run's latest checkpoint as its training evaluation does (same test split, key and threat "
    "model), with any methods, and prints the accuracies and every method's settings as JSON.",
    {
      "config": _RUN_CONFIG_HELP,
      "workdir": "Run directory to read.",
      "methods": None,
      "per_example": None,
      "compact": None,
      "best": None,
      "curve": None,
      "curve_runs": None,
    },
  ),
  "export": (
    "Writes the run's latest model: masked dense weights as .npz, or a reference-layout PyTorch state dict "
    "(.pth) and the reference class that loads it.",
    {
      "config": _RUN_CONFIG_HELP,
      "workdir": "Run directory to read.",
      "out": "Output file: .npz (numpy) or .pth (PyTorch state dict).",
      "dense": None,
      "compact": None,
    },
  ),
  "certify": (
    "Certifies the run's smoothed classifier (Cohen et al.'s CERTIFY) on every skip-th test example; writes "
    "certify.tsv and certified_accuracy.{txt,json,png}.",
    {
      "config": _RUN_CONFIG_HELP,
      "workdir": "Run directory to read.",
      "out": "Output directory (default WORKDIR/certify_sigma<SIGMA>).",
      "sigma": None,
      "n0": None,
      "n": None,
      "alpha": None,
      "skip": None,
      "max_examples": None,
      "certify_batch": None,
      "best": None,
    },
  ),
}
_CONFIG_HELP = """config:
  --config FILE[:ARG]   FILE is a Python file whose get_config(ARG) returns an ml_collections ConfigDict
                        (configs/*.py; each one's docstring has its run command); ARG is the text after ':',
                        e.g. configs/adversarial.py:model=wrn_28_4,objective=trades
  --config.KEY=VALUE    overrides one key, dotted: --config.k=0.01, --config.stages.prune.lr=0.05,
                        --config.eval.methods="('pgd_linf','ibp')"; an unknown key is an error naming it
  The keys: docs/configuration.md; every key with its default: hydra_jax/config.py (default_config).
  --helpfull lists absl's own flags too (--verbosity, ...).
  An error is one line; HYDRA_JAX_TRACEBACK=1 shows its traceback (docs/failures.md)."""


def command_help(command: str) -> str:
  """The `hydra-jax COMMAND --help` text: usage, what it does, its own flags, the config syntax."""
  summary, own = _COMMAND_HELP[command]
  config = "--config FILE[:ARG] [--config.KEY=VALUE ...]"
  usage = f"{config} --workdir DIR" if command == "train" else f"--workdir DIR [{config}]"
  lines = [
    f"usage: hydra-jax {command} {usage} [flags]",
    "",
    *textwrap.wrap(summary, 110),
    "",
    "flags:",
  ]
  for name, text in own.items():
    flag = flags.FLAGS[name]
    default = "" if flag.default is None or name in ("config", "workdir") else f" (default: {flag.default_as_str})"
    metavar = {"config": " FILE[:ARG]", "workdir": " DIR", "out": " PATH", "per_example": " FILE"}.get(name, "")
    lines.append(f"  --{name}{metavar}")
    lines += textwrap.wrap((text or flag.help) + default, 104, initial_indent="      ", subsequent_indent="      ")
  return "\n".join([*lines, "", _CONFIG_HELP])


def _run(command: str) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  config, workdir = _CONFIG.value, _WORKDIR.value
  if workdir is None or (config is None and command == "train"):
    missing = "--workdir is" if config is not None or command != "train" else "--config and --workdir are"
    raise errors.UserError(f"{missing} required (see hydra-jax {command} --help)")
  _check_paths(command, workdir)
  if config is None:  # eval, export, certify: the run's own config
    config = export.run_config(workdir, "best" if _BEST.value and command != "export" else "latest")
  else:
    config_lib.check_values(config)  # the overrides' numbers and names (train checks all of check_config)
  if command == "train":
    result = pipeline.train_and_evaluate(config, workdir)
    if isinstance(result, list):
      print(pipeline.summary_table(result))
    else:
      print(json.dumps(result, indent=2))
  elif command == "eval" and _CURVE.value:
    workdirs = [workdir, *(_CURVE_RUNS.value or [])]
    results = export.security_curve(_CONFIG.value, workdirs, _CURVE.value)
    print(json.dumps(results, indent=2))
  elif command == "eval":
    results = export.evaluate_checkpoint(
      config,
      workdir,
      methods=_METHODS.value,
      per_example=_PER_EXAMPLE.value,
      compact=_COMPACT.value,
      best=_BEST.value,
    )
    print(json.dumps(results, indent=2))
  elif command == "certify":
    print(
      export.certify_checkpoint(
        config,
        workdir,
        _certify_dir(workdir),
        sigma=_SIGMA.value,
        n0=_N0.value,
        n=_N.value,
        alpha=_ALPHA.value,
        batch_size=_CERTIFY_BATCH.value,
        skip=_SKIP.value,
        max_examples=_MAX_EXAMPLES.value,
        best=_BEST.value,
      )["table"]
    )
  else:
    if _COMPACT.value:
      print(export.export_compact(config, workdir, _OUT.value))
    else:
      print(export.export_checkpoint(config, workdir, _OUT.value, dense=_DENSE.value))


def _certify_dir(workdir: str) -> str:
  return _OUT.value or paths.join(workdir, f"certify_sigma{_SIGMA.value}")


def _check_paths(command: str, workdir: str) -> None:
  """The flags' paths before any work: reachable (`paths.check_access`), and the command's output of the right
  kind and writable (`export.check_output`; train's workdir: `pipeline.train_and_evaluate`)."""
  for location in (workdir, _OUT.value, _PER_EXAMPLE.value, _CURVE.value, *(_CURVE_RUNS.value or [])):
    if location:
      paths.check_access(location)
  if command == "export" and not _OUT.value:
    raise errors.UserError("export needs --out FILE (.npz or .pth)")
  kind, location = {
    "train": (None, None),
    "eval": ("curve", _CURVE.value) if _CURVE.value else ("per_example", _PER_EXAMPLE.value),
    "export": ("compact" if _COMPACT.value else "export", _OUT.value),
    "certify": ("certify", _certify_dir(workdir)),
  }[command]
  if location:
    export.check_output(kind, location)


def _show_tracebacks(argv: list[str]) -> bool:
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or any(a.startswith("--verbosity") for a in argv)


def _fail(command: str, message: str) -> None:
  print(f"hydra-jax {command}: error: {message}", file=sys.stderr)
  sys.exit(1)


def _parse_flags(command: str, argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.KEY` or a bad flag value reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:  # ml_collections: an override of a key the config lacks
    key, _, hint = str(error.args[0] if error.args else error).partition("\n")  # hint: 'Did you mean ...?'
    key = key.strip("'\"")
    given = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    if not given or _show_tracebacks(argv):
      raise  # not an override's key: an error inside the config file keeps its traceback
    _fail(
      command,
      f"{', '.join(given)}: the config has no key '{key}'{f' ({hint.strip()})' if hint.strip() else ''}; the keys "
      f"are listed in hydra_jax/config.py (default_config) and the config file",
    )
  except flags.Error as error:
    if _show_tracebacks(argv):
      raise
    cause = error.__context__  # absl recasts a parser's ValueError; a ConfigError (from --config) says it all
    _fail(command, str(cause if isinstance(cause, errors.UserError) else error))


def main(argv: list[str] | None = None) -> None:
  """Entry point of the `hydra-jax` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("--help", "-h", "help"):
    usage = f"usage: hydra-jax {{{','.join(COMMANDS)}}} --config FILE[:ARG] --workdir DIR [flags]\n\n{__doc__}"
    print(usage, file=sys.stdout if len(argv) > 1 else sys.stderr)
    sys.exit(0 if len(argv) > 1 else 2)
  if argv[1] not in COMMANDS:
    close = difflib.get_close_matches(argv[1], COMMANDS, n=1)
    print(
      f"hydra-jax: '{argv[1]}' is not a command"
      + (f"; did you mean '{close[0]}'?" if close else "")
      + f" (commands: {', '.join(COMMANDS)}; hydra-jax COMMAND --help lists its flags)",
      file=sys.stderr,
    )
    sys.exit(2)
  command = argv.pop(1)
  if any(arg in ("--help", "-h", "-?", "--helpshort") for arg in argv[1:]):
    print(command_help(command))
    sys.exit(0)
  try:
    app.run(lambda _: _run(command), argv=argv, flags_parser=lambda args: _parse_flags(command, args))
  # Bad input; a method the model does not support (e.g. a bound through an operation with no sound rule, which
  # `bounds` names); a diverged run; peers absent.
  except (errors.UserError, NotImplementedError, FloatingPointError, TimeoutError) as error:
    if _show_tracebacks(argv):
      raise
    _fail(command, str(error))
  except preemption.Preempted as stop:  # SIGTERM / SIGINT: a checkpoint at the step reached, then exit
    print(f"hydra-jax {command}: {stop}", file=sys.stderr)
    sys.exit(128 + stop.signum)


if __name__ == "__main__":
  main()
