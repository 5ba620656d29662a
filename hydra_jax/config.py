"""Run configuration: every key a run reads, config-file helpers, and the checks that run before anything.

A config is a plain `ml_collections.ConfigDict` (numbers, strings, tuples, dicts). Config files under
`configs/` import only this module:

  from hydra_jax import config as config_lib

  def get_config(arg=None):
    args = config_lib.parse_config_arg(arg, model="vgg16_bn")   # 'model=wrn_28_4' -> typed values
    config = config_lib.default_config()
    config.model.name = args.model
    return config

`load_config('configs/adversarial.py:model=wrn_28_4')` is what `--config FILE[:ARG]` gives on the command line.
`check_config(config)` raises `errors.ConfigError` naming the first invalid key before a run writes anything;
`lookup(config, 'stages.prune.lr')` reads a dotted key and names it when it does not exist.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import math
import os
import re
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from hydra_jax import attacks
from hydra_jax import autoattack
from hydra_jax import baselines
from hydra_jax import data
from hydra_jax import data_formats
from hydra_jax import errors
from hydra_jax import evaluate
from hydra_jax import harp
from hydra_jax import masking
from hydra_jax import models
from hydra_jax import objectives
from hydra_jax import optim
from hydra_jax import parallel
from hydra_jax import smoothing

# HYDRA's stages, then the baselines' training phases that change the train step (`baselines.phase_hooks`).
STAGES = ("pretrain", "prune", "finetune", "str", "admm", "rigl")


def default_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with the reference's CIFAR-10 defaults (spec section 7)."""
  c = ml_collections.ConfigDict()
  c.seed = 1234
  # 'pretrain' | 'prune' | 'finetune' | 'str' (STR from scratch) | 'admm' (Adv-ADMM's phase) | 'rigl' (RigL from
  # scratch at k) | 'all' (pretrain, then per k: prune, finetune and the baselines).
  c.stage = "pretrain"
  c.source = ""  # prune/finetune/admm: workdir or checkpoint dir of the previous stage, or a HYDRA PyTorch .pth.tar.
  c.k = 0.01  # fraction of weights KEPT in prune/finetune (admm: the k-sparse set it is pulled toward).
  c.ks = (0.1, 0.01)  # stage='all': one prune + finetune (+ baselines) branch per k.
  # stage='all': the baselines run beside HYDRA (hydra_jax.baselines names): lwm, snip, random, admm and rigl at each
  # k, str once (its sparsity is what it reaches).
  c.baselines = ("lwm",)
  # grad_batches: SNIP's gradient batches; s_init: STR's initial threshold parameter (sigmoid(s) on |w|);
  # rho, rho_growth, admm_interval_epochs: Adv-ADMM's penalty, its growth per Z/U update, and the update interval;
  # rigl_*: RigL's drop fraction alpha, steps between mask updates delta_t, last update at end_fraction of the
  # stage's steps, per-layer density 'uniform' (k in every layer) or 'erk' (Erdos-Renyi-Kernel, k overall).
  c.baseline = ml_collections.ConfigDict(
    {
      "grad_batches": 1,
      "s_init": -5.0,
      "rho": 1e-3,
      "rho_growth": 1.3,
      "admm_interval_epochs": 20,
      "rigl_alpha": 0.3,
      "rigl_delta_t": 100,
      "rigl_end_fraction": 0.75,
      "rigl_distribution": "uniform",
    }
  )
  c.freeze_bn = False  # prune: freeze BatchNorm scale/shift too.
  # granularity: 'weight' (HYDRA: one score per weight) | 'channel' (structured: one score per output channel,
  # k = fraction of channels kept per group of tied channels; docs/structured.md).
  # include / exclude: regular expressions (re.search) over parameter paths choosing the prunable weights
  # (masking.PathFilter; default: every conv and dense kernel), e.g. exclude=('^conv1/', '^linear/').
  c.mask = ml_collections.ConfigDict(
    {"scope": "layer", "min_layer_k": 0.0, "granularity": "weight", "include": (), "exclude": ()}
  )
  # HARP (Zhao & Wressnegger 2023; docs/harp.md): learn_rates=True makes prune learn each layer's kept fraction beside
  # the scores (HARP's harp_prune; with learn_scores=False the rates only, its rate_prune), k_l = sigmoid(k_score_l)
  # (1 - k_min) + k_min with k_min = rate_alpha * k, from the initial per-layer rates rate_init ('uniform' | 'erk' |
  # 'dense'), with the hardware loss hw_gamma_e * max(kept / target - 1, 0), hw_gamma_e = (epoch + 1) * hw_gamma when
  # hw_gamma_dynamic. finetune from such a run keeps the learned rates, rounded so that round(k N) weights stay.
  # With granularity='channel' each channel group learns its rate and the loss counts FLOPs (HARP's FLOP loss; the
  # target: structured HYDRA's FLOPs at k), rate_init 'uniform' | 'dense'.
  c.mask.learn_rates = False
  c.mask.learn_scores = True
  c.mask.rate_init = "uniform"
  c.mask.rate_alpha = 0.1
  c.mask.hw_gamma = 1.0
  c.mask.hw_gamma_dynamic = True

  # width: channel-width multiplier (models.get_model; 1 = the registered network, others only for the ResNet,
  # WRN, MobileNetV2 and GoogLeNet families).
  # name: a zoo name (models.model_names()) or an own Flax Linen / NNX model, 'package.module:Name' or
  # 'path/to/file.py:Name', built with the arguments in kwargs (docs/own_models.md).
  c.model = ml_collections.ConfigDict(
    {"name": "vgg16_bn", "num_classes": 0, "dtype": "float32", "width": 1.0, "kwargs": {}}
  )
  c.data = ml_collections.ConfigDict(
    {
      "name": "cifar10",
      "data_dir": "",
      "batch_size": 128,
      "eval_batch_size": 256,
      "image_size": 0,
      "data_fraction": 1.0,
      "semisup_path": "",
      "semisup_fraction": 1.0,
      "prefetch": 2,
      "workers": 0,
      "eval_examples": 0,
    }
  )  # eval_examples: evaluate on the first N test examples only (0: all).
  c.data.format = "auto"  # files in data_dir: 'auto' (detect) | 'tfds' | 'cifar_pickle' | 'svhn_mat' | 'image_folder'.
  c.objective = objective_config("trades")
  c.optimizer = ml_collections.ConfigDict(
    {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine", "warmup_epochs": 0, "warmup_lr": 0.1}
  )
  # Per-stage length, learning rate (reference scripts) and score init: a masking.SCORE_INITS name, or
  # 'source' for the source checkpoint's scores. LWM is finetune with score_init='scaled' from a pretrain run.
  # str and rigl train from scratch (a pretrain-like schedule); admm from the pretrained weights.
  c.stages = ml_collections.ConfigDict(
    {
      "pretrain": {"epochs": 100, "lr": 0.1},
      "prune": {"epochs": 20, "lr": 0.1, "score_init": "scaled"},
      "finetune": {"epochs": 100, "lr": 0.01, "score_init": "source"},
      "str": {"epochs": 100, "lr": 0.1},
      "admm": {"epochs": 100, "lr": 0.01},
      "rigl": {"epochs": 100, "lr": 0.1},
    }
  )
  # In-training evaluation: evaluate.py methods (attacks or verifiers) at the threat model (norm, eps); PGD's
  # step_size / steps / restarts; see evaluate.config_settings. No methods: clean accuracy only.
  c.eval = ml_collections.ConfigDict(
    {
      "every_epochs": 1,
      "methods": ("pgd_linf",),
      "norm": "linf",
      "eps": 8 / 255,
      "step_size": 2 / 255,
      "steps": 10,
      "restarts": 1,
    }
  )
  # The `smooth` certifier's own settings (eps: the headline l2 radius; sigma: the training noise_std).
  c.eval.smooth = {k: v for k, v in evaluate.get_method("smooth").defaults.items() if k != "norm"}
  # AutoAttack's version and counts (the paper's by default), for `autoattack` (l_inf) and `autoattack_l2`.
  c.eval.autoattack = dict(evaluate.AUTOATTACK_SETTINGS)
  c.eval.autoattack_l2 = dict(evaluate.AUTOATTACK_SETTINGS)
  c.checkpoint = ml_collections.ConfigDict({"keep": 3, "every_steps": 0, "async_save": True})
  # Multi-host (see parallel.init_from_config): setting coordinator_address or num_processes implies
  # distributed=true. Unset keys ("", 0, -1) come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  # JAX_PROCESS_ID, else from JAX's auto-detection (TPU VM, SLURM, Open MPI, Kubernetes).
  c.parallel = ml_collections.ConfigDict(
    {
      "mode": "auto",
      "distributed": False,
      "coordinator_address": "",  # 'host:port' of process 0, reachable from every host.
      "num_processes": 0,  # processes (one per host) in the run.
      "process_id": -1,  # this process, in [0, num_processes).
      "timeout_s": 300,
    }
  )  # seconds to wait for every process to join (then exit with a message).
  c.log = ml_collections.ConfigDict({"every_steps": 50, "progress": True, "tensorboard": False})
  c.stop_after_steps = 0  # end the run after this global step (0: never); rerunning resumes it.
  # JAX's PRNG flavour for every random draw of a run (recorded with each checkpoint; a resume must match).
  # False: the classic threefry, which compiles in a fraction of a second on CPU where the partitionable one
  # takes seconds per random op; every draw of a run happens per device, so partitionability buys nothing.
  c.threefry_partitionable = False
  return c


def objective_config(name: str) -> ml_collections.ConfigDict:
  """{'name': name} plus the defaults of every registered objective, so --config.objective.name can switch.

  Each objective reads only its own keys (e.g. trades: eps, step_size, steps, norm, beta; free: eps,
  replays; smooth: noise_std, beta); `name`'s own defaults win where objectives disagree.
  """
  merged = {}
  for other in objectives.objective_names():
    merged.update(objectives.get_objective(other).defaults)
  return ml_collections.ConfigDict({"name": name, **merged, **objectives.get_objective(name).defaults})


def parse_config_arg(
  arg: str | None, *, choices: Mapping[str, Sequence[str]] | None = None, **defaults: Any
) -> ml_collections.ConfigDict:
  """'model=wrn_28_4,objective=trades' -> ConfigDict over `defaults`; values typed like the default.

  For config files' `get_config(arg)`; an unknown name, a value that is not of its default's type, and a value
  outside `choices[name]` where given raise ConfigError naming the argument and the valid ones.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, sep, value = item.partition("=")
    if not sep or name not in defaults:
      close = difflib.get_close_matches(name, defaults, n=1)
      raise errors.ConfigError(
        f"config argument '{item}' is not NAME=VALUE with NAME one of {', '.join(defaults)}"
        + (f" (did you mean {close[0]}?)" if close and sep else "")
      )
    parsed[name] = _typed_like(defaults[name], name, value)
  for name, valid in (choices or {}).items():
    if parsed[name] not in valid:
      raise errors.ConfigError(f"config argument {name}={parsed[name]!r} is invalid; valid: {', '.join(valid)}")
  return parsed


def _typed_like(default: Any, name: str, value: str) -> Any:
  if isinstance(default, bool):
    return value.lower() in ("1", "true")
  try:
    return type(default)(value)
  except ValueError:
    raise errors.ConfigError(f"config argument {name}={value!r} is not a valid {type(default).__name__}") from None


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The locked config of `spec` = 'FILE[:ARG]': FILE's `get_config(ARG)` (`get_config()` without ':'), as the
  command line's `--config FILE[:ARG]` loads it (before its `--config.KEY=VALUE` overrides), with its names and
  numbers checked (`check_values`).

  Example: `load_config('configs/adversarial.py:model=wrn_28_4,objective=trades')`.

  Raises:
    ConfigError: FILE does not exist or does not parse (naming FILE:LINE), it defines no `get_config` returning a
      ConfigDict, ARG is invalid, or the config holds an unknown name or a number that is not finite.
  """
  path, has_arg, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.ConfigError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location("hydra_jax_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as error:  # IndentationError too
    line = f": {error.text.strip()}" if error.text and error.text.strip() else ""
    raise errors.ConfigError(f"config file {path}:{error.lineno}: {error.msg}{line}") from error
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise errors.ConfigError(f"config file {path} must define get_config(arg=None) returning a ConfigDict")
  try:
    config = get_config(*([arg] if has_arg else []))
    if not isinstance(config, ml_collections.ConfigDict):
      raise errors.ConfigError(f"get_config returned a {type(config).__name__}, not a ConfigDict")
    check_values(config)
  except errors.ConfigError as error:
    raise errors.ConfigError(f"config file {path}: {error}") from error
  config.lock()
  return config


def lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """config['a']['b'] for 'a.b'; raises ConfigError naming the missing key."""
  value = config
  for depth, part in enumerate(dotted.split(".")):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      missing = ".".join(dotted.split(".")[: depth + 1])
      raise errors.ConfigError(f"config.{missing} does not exist (reading config.{dotted})")
    value = value[part]
  return value


def stage_config(config: ml_collections.ConfigDict, stage: str, **overrides: Any) -> ml_collections.ConfigDict:
  """A copy of `config` set to run `stage`, with `overrides` of top-level or dotted keys.

  Example: `stage_config(config, 'finetune', source=pretrain_dir, **{'stages.finetune.score_init': 'scaled'})`.
  """
  new = ml_collections.ConfigDict(config.to_dict())
  new.stage = stage
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    parent = lookup(new, ".".join(parents)) if parents else new
    if leaf not in parent:
      raise errors.ConfigError(f"config.{key} does not exist")
    parent[leaf] = value
  return new


def prng_scope(config: ml_collections.ConfigDict) -> contextlib.AbstractContextManager:
  """The context every random draw of a run happens in: the PRNG flavour of `config.threefry_partitionable`.

  The library decides this here, not the entry point, so that a run from the command line and one from a
  notebook draw the same numbers; the setting is restored on exit.
  """
  return jax.threefry_partitionable(config.threefry_partitionable)


def num_classes(config: ml_collections.ConfigDict) -> int:
  """config.model.num_classes, or the dataset's number of classes when it is 0."""
  return config.model.num_classes or data.get_dataset_info(config.data.name).num_classes


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.model.kwargs as a plain dict ({} where a stored config predates the key)."""
  kwargs = config.model.get("kwargs") or {}
  return kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the model's inputs for `config.data`."""
  info = data.get_dataset_info(config.data.name)
  side = config.data.image_size or info.image_shape[0]
  return side, side, info.image_shape[2]


def _check_choices(config: ml_collections.ConfigDict) -> None:
  choices = {
    "stage": (*STAGES, "all"),
    "mask.scope": ("layer", "global"),
    "optimizer.name": optim.optimizer_names(),
    "optimizer.schedule": optim.schedule_names(),
    "parallel.mode": ("auto", *parallel.MODES),
    "eval.norm": attacks.NORMS,
    "stages.prune.score_init": (*_score_inits(config), "source"),
    "stages.finetune.score_init": (*_score_inits(config), "source"),
    "data.format": ("auto", *data_formats.FORMATS),
    "baseline.rigl_distribution": baselines.RIGL_DISTRIBUTIONS,
  }
  for key, valid in choices.items():
    value = lookup(config, key)
    if value not in valid:
      raise errors.ConfigError(f"config.{key}={value!r} is invalid; valid: {', '.join(map(str, valid))}")
  registries = {
    "model.name": lambda name: models.get_model(name, 10, width=config.model.width, kwargs=model_kwargs(config)),
    "data.name": data.get_dataset_info,
    "objective.name": objectives.get_objective,
    "baselines": lambda names: [baselines.get_baseline(name) for name in names],
    "eval.methods": lambda names: [evaluate.get_method(name) for name in names],
  }
  for key, get in registries.items():
    try:
      get(lookup(config, key))
    except ValueError as error:  # the registries list the valid names
      raise errors.ConfigError(f"config.{key}: {error}") from None


def _score_inits(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  if config.mask.get("granularity") == "channel":
    return tuple(masking.CHANNEL_SCORE_INITS)
  return tuple(masking.SCORE_INITS)


def _check_channel_granularity(config: ml_collections.ConfigDict) -> None:
  """A known config.mask.granularity (absent: 'weight'), and what 'channel' does not support: a global scope,
  the weight-only baselines and stages."""
  granularity = config.mask.get("granularity", "weight")
  if granularity not in masking.GRANULARITIES:
    raise errors.ConfigError(
      f"config.mask.granularity={granularity!r} is invalid; valid: {', '.join(masking.GRANULARITIES)}"
    )
  if granularity != "channel":
    return
  if config.mask.scope != "layer":
    raise errors.ConfigError("config.mask.scope='global' needs mask.granularity='weight'; channels rank per group")
  if config.stage in ("str", "admm", "rigl"):
    raise errors.ConfigError(f"stage '{config.stage}' prunes weights; set --config.mask.granularity=weight")
  others = [name for name in config.baselines if name != "lwm"]
  if config.stage == "all" and others:
    raise errors.ConfigError(
      f"config.baselines {others} have no channel version; with mask.granularity='channel' use --config.baselines=lwm"
    )


def _check_path_filter(config: ml_collections.ConfigDict) -> None:
  """config.mask.include / exclude: compilable patterns, set only where the mask is HYDRA's or a fixed mask's."""
  patterns = tuple(config.mask.get("include", ())) + tuple(config.mask.get("exclude", ()))
  if not patterns:
    return
  for pattern in patterns:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as error:
      raise errors.ConfigError(f"config.mask pattern {pattern!r} is not a regular expression ({error})") from None
  if config.mask.get("granularity", "weight") != "weight":
    raise errors.ConfigError("config.mask.include / exclude choose weights; they need mask.granularity='weight'")
  others = [name for name in config.baselines if name not in ("lwm", "snip", "random")]
  if config.stage in ("str", "admm", "rigl") or (config.stage == "all" and others):
    stage = config.stage if config.stage != "all" else f"baselines {others}"
    raise errors.ConfigError(
      f"config.mask.include / exclude apply to HYDRA and the fixed-mask baselines (lwm, snip, random), not to {stage}"
    )


_RATE_KEYS = ("learn_rates", "learn_scores", "rate_init", "rate_alpha", "hw_gamma", "hw_gamma_dynamic")


def rate_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.mask's HARP keys (`_RATE_KEYS`), the defaults where a config lacks them (one setting its mask as a dict)."""
  defaults = default_config().mask
  return ml_collections.ConfigDict({key: config.mask.get(key, defaults[key]) for key in _RATE_KEYS})


def _check_rates(config: ml_collections.ConfigDict) -> None:
  """What HARP's learned rates (config.mask.learn_rates) need: per-layer masks, an initial strategy of the
  granularity and an alpha in [0, 1)."""
  mask = rate_settings(config)
  if mask.rate_init not in harp.STRATEGIES:
    raise errors.ConfigError(
      f"config.mask.rate_init={mask.rate_init!r} is invalid; valid: {', '.join(harp.STRATEGIES)}"
    )
  if not 0 <= mask.rate_alpha < 1:
    raise errors.ConfigError(f"config.mask.rate_alpha={mask.rate_alpha!r} must lie in [0, 1): k_min = alpha * k")
  if mask.hw_gamma < 0:
    raise errors.ConfigError(f"config.mask.hw_gamma={mask.hw_gamma!r} must be >= 0")
  if not mask.learn_rates:
    return
  if config.mask.scope != "layer":
    raise errors.ConfigError("config.mask.learn_rates=true learns per-layer rates; set --config.mask.scope=layer")
  if config.mask.get("granularity", "weight") == "channel" and mask.rate_init not in harp.CHANNEL_STRATEGIES:
    raise errors.ConfigError(
      f"config.mask.rate_init={mask.rate_init!r} has no channel version; valid with mask.granularity=channel: "
      f"{', '.join(harp.CHANNEL_STRATEGIES)}"
    )


def check_eval_methods(config: ml_collections.ConfigDict, methods: Sequence[str]) -> None:
  """Raises ConfigError naming an unknown evaluation method of `methods` or an invalid `config.eval.smooth`
  setting (when 'smooth' is among them), before anything is trained or evaluated."""
  try:
    settings = evaluate.config_settings(config.eval, methods)
    for name, method_settings in settings.items():
      if evaluate.get_method(name).kind == "ensemble":
        autoattack.version_attacks(method_settings["version"])
    if "smooth" in settings:
      s = settings["smooth"]
      smoothing.check_settings(s["sigma"], s["alpha"], n0=s["n0"], n=s["n"], batch_size=s["batch_size"])
  except ValueError as error:
    raise errors.ConfigError(f"config.eval: {error}") from None


def _check_finite(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first float (alone or in a tuple) that is inf or NaN."""
  for key, value in _leaves(config.to_dict()):
    numbers = value if isinstance(value, (tuple, list)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
      raise errors.ConfigError(f"config.{key}={value!r} is not a finite number")


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  """(dotted key, value) of every non-dict value of the nested dict `tree`."""
  leaves = []
  for name, value in tree.items():
    if isinstance(value, Mapping):
      leaves += _leaves(value, f"{prefix}{name}.")
    else:
      leaves.append((f"{prefix}{name}", value))
  return leaves


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first number that is not finite or name that no registry knows (stage, model,
  dataset, objective, optimizer, schedule, evaluation methods, baselines, ...): what every command checks of the
  config it is given, and `load_config` of a file's. `check_config` checks the rest before a run."""
  _check_finite(config)
  _check_choices(config)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value is invalid."""
  _check_channel_granularity(config)
  _check_path_filter(config)
  _check_rates(config)
  check_values(config)
  check_eval_methods(config, config.eval.methods)
  for key, value in {"k": config.k, **{f"ks[{i}]": k for i, k in enumerate(config.ks)}}.items():
    if not 0 < value <= 1:
      raise errors.ConfigError(f"config.{key}={value!r} must lie in (0, 1]: it is the fraction of weights KEPT")
  for stage in STAGES:
    for field in ("epochs", "lr"):
      if not lookup(config, f"stages.{stage}.{field}") >= 0:
        raise errors.ConfigError(f"config.stages.{stage}.{field} must be >= 0")
  noise = config.objective.get("noise_std") if config.objective.name in ("smooth", "smooth_imagenet") else None
  if "smooth" in config.eval.methods and noise is not None and config.eval.smooth.sigma != noise:
    warnings.warn(
      f"config.eval.smooth.sigma={config.eval.smooth.sigma} certifies another noise level than the model is "
      f"trained with (config.objective.noise_std={noise})",
      stacklevel=2,
    )
  if config.objective.get("attack_chunk_size", 0) < 0:
    raise errors.ConfigError("config.objective.attack_chunk_size must be >= 0 (0: chosen per backend)")
  if config.stage in ("prune", "finetune", "admm") and not config.source:
    raise errors.ConfigError(f"config.source must name the checkpoint to start stage '{config.stage}' from")
  for key in (
    "data.batch_size",
    "data.eval_batch_size",
    "checkpoint.keep",
    "log.every_steps",
    "eval.every_epochs",
    "baseline.grad_batches",
    "baseline.admm_interval_epochs",
    "baseline.rigl_delta_t",
  ):
    if lookup(config, key) <= 0:
      raise errors.ConfigError(f"config.{key} must be positive")
  for key in ("baseline.rigl_alpha", "baseline.rigl_end_fraction"):
    if not 0 < lookup(config, key) <= 1:
      raise errors.ConfigError(f"config.{key}={lookup(config, key)!r} must lie in (0, 1]")
