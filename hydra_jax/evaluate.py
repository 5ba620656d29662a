"""Robust accuracy, one definition for training, `hydra-jax eval` and experiments: clean top-1 / top-5 and a
registry of evaluation methods, attacks (PGD, APGD-CE/DLR, targeted APGD-DLR), verifiers (IBP, CROWN-IBP,
symbolic intervals) and a certifier (randomized smoothing), with their per-example worst case.

An example counts as robust under a method when it is classified correctly both clean and by the method:
an attack's output `x_adv` is classified correctly, or a verifier certifies the example. The headline
`robust` accuracy is the per-example worst case over all methods run (and `robust_linf` / `robust_l2` over
the methods of one threat model). A certifier speaks of another classifier, the base model smoothed with
Gaussian noise (`smooth`: Cohen et al.'s certified accuracy at l2 radius eps and at each of its `radii`, as
'smooth' and 'smooth_r<radius>'), so its numbers stand alone, outside the clean and worst-case ones.
Every method runs on the whole batch (not only on the points earlier methods left robust), which keeps shapes
static; the worst case is the same. The ensemble methods `autoattack` / `autoattack_l2` run AutoAttack's
sequence (`hydra_jax.autoattack`) the authors' way inside the batch program (each attack only on the points
still robust, gathered into chunks) and add a column per attack ('autoattack_apgd_ce', ...) and 'autoattack_masking';
`min_norms` gives FMN's smallest adversarial norms per example, for security curves.

Usage:

  results = evaluate.evaluate(apply_fn, variables, test_batches, key=jax.random.key(0),
                              methods=('pgd_linf', 'apgd_ce', 'apgd_dlr', 'apgd_t'),
                              config={'pgd_linf': {'steps': 50, 'restarts': 5}})
  print(results['clean'], results['clean_top5'], results['robust'], results['apgd_ce'])

  settings = evaluate.config_settings(config.eval)     # a run's config.eval -> per-method settings

`apply_fn(variables, x, train) -> (logits, variables)` is called with train=False; pass `variables=None`
to give a `logits_fn(x) -> logits` instead. Each batch runs as one compiled program (every method in it),
compiled once per batch shape and cached across calls for the same function object, on one device or
data-parallel (`mode='shard_map'` / `'pmap'`, counts summed over devices).

A new method is one registration:

  evaluate.register_method('my_verifier', verified, {'norm': 'linf', 'eps': 8 / 255}, kind='verifier')

with `verified(logits_fn, x, y, *, key, eps, norm) -> bool[B]` (an attack instead returns `x_adv`). The
verifiers `ibp`, `crown_ibp` and `symbolic` (`hydra_jax.bounds`) are registered so: their number is the
verified accuracy on the l_inf eps-ball clipped to [0, 1], with the verifier and eps as its name and setting.
A run's `config.eval.<method>` (e.g. `config.eval.smooth.sigma`) overrides that method's settings.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from hydra_jax import PyTree
from hydra_jax import attacks
from hydra_jax import autoattack
from hydra_jax import bounds
from hydra_jax import min_norm
from hydra_jax import parallel
from hydra_jax import smoothing

Array = jax.Array
KINDS = ("attack", "verifier", "certifier", "ensemble")


class Method(NamedTuple):
  """A registered evaluation method.

  Attributes:
    fn: `fn(logits_fn, x, y, *, key, **settings)`; an attack returns x_adv [B, H, W, C], a verifier returns
      correct bool [B] (certified robust and correctly classified), a certifier (of the smoothed classifier)
      bool [B, 1 + R]: certified correct at eps and at each of its settings' `radii` [R]; an ensemble (a
      sequence of attacks, AutoAttack) a dict of bool [B] per stage, robust under every attack up to that
      stage, the last stage its result, and bool [B] 'masking' (see `autoattack.autoattack`).
    defaults: default settings, including 'norm' and 'eps'.
    kind: 'attack', 'verifier', 'certifier' or 'ensemble'.
    config_keys: the keys of a run's `config.eval` this method takes when its norm is `config.eval.norm`.
  """

  fn: Callable[..., Array]
  defaults: Mapping[str, Any]
  kind: str = "attack"
  config_keys: tuple[str, ...] = ("eps",)


_METHODS: dict[str, Method] = {}
_RESERVED = ("clean", "clean_top5", "robust", "num_examples")


def register_method(
  name: str,
  fn: Callable[..., Array],
  defaults: Mapping[str, Any],
  *,
  kind: str = "attack",
  config_keys: Sequence[str] = ("eps",),
) -> None:
  """Registers an evaluation method (see `Method`); `defaults` must include 'norm' and 'eps'.

  Args:
    name: the method's name, also its key in the results.
    fn: the attack or verifier.
    defaults: its default settings (keyword arguments of `fn`), with 'norm' and 'eps'.
    kind: 'attack', 'verifier', 'certifier' or 'ensemble'.
    config_keys: keys of a run's `config.eval` that override the defaults when the norms agree.
  """
  if name in _METHODS or name in _RESERVED or name.startswith("robust_"):
    raise ValueError(f"evaluation method {name!r} is already registered or reserved")
  if not {"norm", "eps"} <= set(defaults):
    raise ValueError(f"evaluation method {name!r}: defaults need 'norm' and 'eps', got {sorted(defaults)}")
  if kind not in KINDS:
    raise ValueError(f"evaluation method {name!r}: kind {kind!r} is not one of {KINDS}")
  _METHODS[name] = Method(fn, dict(defaults), kind, tuple(config_keys))


_PGD_KEYS = ("eps", "step_size", "steps", "restarts")
register_method(
  "pgd_linf",
  attacks.pgd,
  dict(norm="linf", eps=8 / 255, step_size=2 / 255, steps=20, restarts=1, unroll=False),
  config_keys=_PGD_KEYS,
)
register_method(
  "pgd_l2",
  attacks.pgd,
  dict(norm="l2", eps=0.5, step_size=0.125, steps=20, restarts=1, unroll=False),
  config_keys=_PGD_KEYS,
)
register_method("apgd_ce", attacks.apgd, dict(norm="linf", eps=8 / 255, steps=100, loss="ce", restarts=1))
register_method("apgd_dlr", attacks.apgd, dict(norm="linf", eps=8 / 255, steps=100, loss="dlr", restarts=1))
register_method("apgd_t", attacks.apgd_targeted, dict(norm="linf", eps=8 / 255, steps=100, num_targets=9, restarts=1))


def _bound_verifier(bound: str) -> Callable[..., Array]:
  """A verifier certifying the l_inf eps-ball (clipped to [0, 1]) with `bounds.verified_correct(method=bound)`."""

  def verified(logits_fn: attacks.LogitsFn, x: Array, y: Array, *, key: Array, eps: float, norm: str) -> Array:
    del key  # deterministic
    if norm != "linf":
      raise ValueError(f"verifier {bound!r} certifies l_inf balls only, not norm {norm!r}")
    return bounds.verified_correct(logits_fn, x, y, eps=eps, method=bound)

  return verified


for _bound in bounds.METHODS:  # 'ibp', 'crown_ibp', 'symbolic': verified accuracy at the run's l_inf eps
  register_method(_bound, _bound_verifier(_bound), dict(norm="linf", eps=8 / 255), kind="verifier")


def _smoothed_certified(
  logits_fn: attacks.LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  eps: float,
  norm: str,
  radii: Sequence[float],
  sigma: float,
  n0: int,
  n: int,
  alpha: float,
  batch_size: int,
) -> Array:
  """bool [B, 1 + R]: the smoothed classifier certified correct at l2 radius eps and at each of `radii` [R].

  Monte Carlo settings (sigma, n0, n, alpha, batch_size) as in `smoothing.certified_correct`.
  """
  if norm != "l2":
    raise ValueError(f"smooth certifies l2 radii only, not norm {norm!r}")
  return smoothing.certified_correct(
    logits_fn, x, y, key=key, radii=(eps, *radii), sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size
  )


# Cohen et al.'s certification with n = 10k estimation samples by default (their tables use 100k: set
# config.eval.smooth.n); sigma must be the noise the model was trained with (objective.noise_std).
register_method(
  "smooth",
  _smoothed_certified,
  dict(norm="l2", eps=0.5, radii=(0.0, 0.25, 0.5, 0.75), sigma=0.25, n0=100, n=10_000, alpha=0.001, batch_size=1000),
  kind="certifier",
  config_keys=(),  # its settings come from config.eval.smooth, whatever the run's eval.norm
)


def _autoattack(
  logits_fn: attacks.LogitsFn,
  x: Array,
  y: Array,
  *,
  key: Array,
  eps: float,
  norm: str,
  version: str,
  apgd_steps: int,
  fab_steps: int,
  square_queries: int,
  num_targets: int,
  p_init: float,
) -> dict[str, Array]:
  """AutoAttack's per-stage robustness (`autoattack.autoattack`), the model seen in batch chunks."""
  counts = dict(apgd_steps=apgd_steps, fab_steps=fab_steps, square_queries=square_queries, num_targets=num_targets)
  chunked = attacks.in_chunks(logits_fn, 0)
  return autoattack.autoattack(chunked, x, y, key=key, eps=eps, norm=norm, version=version, p_init=p_init, **counts)[1]


# AutoAttack at the paper's counts (Croce & Hein 2020): 'autoattack' at the run's l_inf eps, 'autoattack_l2'
# at its l2 eps; config.eval.autoattack.version = 'plus' or 'rand' for the other versions.
AUTOATTACK_SETTINGS = dict(
  version="standard", apgd_steps=100, fab_steps=100, square_queries=5000, num_targets=9, p_init=0.8
)
register_method("autoattack", _autoattack, dict(norm="linf", eps=8 / 255, **AUTOATTACK_SETTINGS), kind="ensemble")
register_method("autoattack_l2", _autoattack, dict(norm="l2", eps=0.5, **AUTOATTACK_SETTINGS), kind="ensemble")

DEFAULT_METHODS = ("pgd_linf", "apgd_ce", "apgd_dlr")


def method_names() -> list[str]:
  """The registered method names, sorted."""
  return sorted(_METHODS)


def get_method(name: str) -> Method:
  """Returns the registered method `name`; raises ValueError listing the valid names."""
  if name not in _METHODS:
    raise ValueError(f"unknown evaluation method {name!r}; valid methods: {sorted(_METHODS)}")
  return _METHODS[name]


def default_config(linf_eps: float = 8 / 255, l2_eps: float = 0.5) -> ml_collections.ConfigDict:
  """Settings of every registered method, with eps set per norm and PGD's step size set to eps / 4."""
  config = ml_collections.ConfigDict()
  for name, method in _METHODS.items():
    settings = dict(method.defaults)
    settings["eps"] = {"linf": linf_eps, "l2": l2_eps}.get(settings["norm"], settings["eps"])
    if "step_size" in settings:
      settings["step_size"] = settings["eps"] / 4
    config[name] = settings
  return config


def config_settings(eval_config: Mapping[str, Any], methods: Sequence[str] | None = None) -> dict[str, dict]:
  """Per-method settings for a run's `config.eval`: the threat model of the run applied to its methods.

  Each method of `methods` (default `eval_config['methods']`) gets its defaults, overridden by the keys of
  `eval_config` listed in its `config_keys` when its norm is `eval_config['norm']` (eps for every method,
  and step_size / steps / restarts for PGD; methods of the other norm keep their defaults), then by the
  method's own section `eval_config[name]` if there is one (e.g. `eval.smooth.sigma`).
  """
  settings = {}
  for name in eval_config["methods"] if methods is None else methods:
    method = get_method(name)
    shared = method.config_keys if method.defaults["norm"] == eval_config["norm"] else ()
    own = eval_config.get(name, {})
    settings[name] = {**method.defaults, **{key: eval_config[key] for key in shared if key in eval_config}, **own}
  return settings


def _settings(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
  """The method's defaults overridden by config[name]; unknown setting names raise ValueError."""
  method = get_method(name)
  overrides = dict(config.get(name, {})) if config is not None else {}
  valid = {
    p.name for p in inspect.signature(method.fn).parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY
  } - {"key"}
  unknown = set(overrides) - valid
  if unknown:
    raise ValueError(f"method {name!r}: unknown settings {sorted(unknown)}; valid: {sorted(valid)}")
  settings = {**method.defaults, **overrides}
  return {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}


def top_k_correct(logits: Array, labels: Array, k: int) -> Array:
  """bool [B]: the label is among the k largest logits [B, C] (top-1: the argmax, first index on ties)."""
  if k == 1:
    return jnp.argmax(logits, axis=-1) == labels
  return jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)


def method_correct(
  name: str, settings: Mapping[str, Any], logits_fn: attacks.LogitsFn, x: Array, y: Array, key: Array
) -> Array:
  """bool [B]: the examples that attack or verifier `name` with `settings` does not break or certifies.

  Attacks see `logits_fn` in batch chunks of the backend's `attack_chunk` (`hydra_jax.backend_knobs`,
  `attacks.in_chunks`).
  """
  method = get_method(name)
  if method.kind == "verifier":
    return method.fn(logits_fn, x, y, key=key, **settings)
  x_adv = method.fn(attacks.in_chunks(logits_fn, 0), x, y, key=key, **settings)
  return top_k_correct(logits_fn(x_adv), y, 1)


def batch_correct(
  logits_fn: attacks.LogitsFn, batch: Mapping[str, Array], key: Array, methods: tuple[tuple[str, tuple], ...]
) -> dict[str, Array]:
  """Per-example correctness of one batch: 'clean', 'clean_top5' (more than 5 classes), each method (correct
  clean and under the method), 'robust' and 'robust_<norm>' (per-example worst cases of the attacks and
  verifiers), and for a certifier `name` its certificates at eps ('name') and at each of its radii r
  ('name_r<r>').

  Args:
    logits_fn: `x -> logits` [B, C] in eval mode.
    batch: {'image': [B, H, W, C], 'label': [B] int}.
    key: PRNG key, or per-example keys [B] (`attacks.example_keys`); method m uses fold_in(key, m).
    methods: ((name, sorted settings items), ...).

  Returns:
    bool [B] per name.
  """
  x, y = batch["image"], batch["label"]
  logits = logits_fn(x)
  clean = top_k_correct(logits, y, 1)
  correct = {"clean": clean}
  if logits.shape[-1] > 5:
    correct["clean_top5"] = top_k_correct(logits, y, 5)
  correct["robust"] = clean
  for m, (name, items) in enumerate(methods):
    method, settings, method_key = get_method(name), dict(items), attacks.fold_in(key, m)
    if method.kind == "certifier":  # bool [B, 1 + R]: at eps, then at each radius
      certified = method.fn(logits_fn, x, y, key=method_key, **settings)
      correct[name] = certified[:, 0]
      correct.update({f"{name}_r{r:g}": certified[:, j + 1] for j, r in enumerate(settings["radii"])})
      continue
    if method.kind == "ensemble":  # per stage: robust up to it; the last stage is the method's result
      stages = method.fn(logits_fn, x, y, key=method_key, **settings)
      masking = stages.pop("masking")
      correct.update({f"{name}_{stage}": clean & robust for stage, robust in stages.items()})
      correct[f"{name}_masking"] = masking
      correct[name] = clean & list(stages.values())[-1]
    else:
      correct[name] = clean & method_correct(name, settings, logits_fn, x, y, method_key)
    group = f"robust_{settings['norm']}"
    correct[group] = correct.get(group, clean) & correct[name]
    correct["robust"] = correct["robust"] & correct[name]
  return correct


def weighted_counts(correct: Mapping[str, Array], weight: Array) -> dict[str, Array]:
  """float32 sums of `weight` [B] (0: padding) over all examples ('num_examples') and over the correct ones of
  each bool [B] of `correct`."""
  return {"num_examples": jnp.sum(weight), **{name: jnp.sum(weight * c) for name, c in correct.items()}}


def batch_counts(
  logits_fn: attacks.LogitsFn, batch: Mapping[str, Array], key: Array, methods: tuple[tuple[str, tuple], ...]
) -> dict[str, Array]:
  """`weighted_counts` of `batch_correct` with the batch's 'mask' [B] float (0: padding) as weights."""
  return weighted_counts(batch_correct(logits_fn, batch, key, methods), batch["mask"])


def eval_step(
  state: dict[str, PyTree],
  batch: dict[str, Array],
  *,
  fn: Callable,
  methods: tuple[tuple[str, tuple], ...],
  axis_name: str | None,
) -> tuple[dict, dict[str, dict[str, Array]]]:
  """Per-device step for `parallel.make_runner`: the counts of one batch, summed over devices, and its
  per-example 'label', 'mask' and correctness (`batch_correct`) gathered over devices, in global batch order.

  `state` is {'variables': model variables or None (then `fn` is a logits_fn), 'key': PRNG key, 'batch':
  int32 batch counter}; batch b's key is fold_in(key, b), and its example at position i of the global batch
  draws from fold_in of that with i (`attacks.example_keys`), whatever the device count.
  """
  key = jax.random.fold_in(state["key"], state["batch"])
  key = attacks.example_keys(key, parallel.with_positions(batch, axis_name)["index"])
  variables = state["variables"]
  logits_fn = fn if variables is None else (lambda x: fn(variables, x, False)[0])
  correct = batch_correct(logits_fn, batch, key, methods)
  counts = weighted_counts(correct, batch["mask"])
  examples = {"label": batch["label"], "mask": batch["mask"], **correct}
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
    examples = jax.lax.all_gather(examples, axis_name, tiled=True)
  return {**state, "batch": state["batch"] + 1}, {"counts": counts, "examples": examples}


@functools.lru_cache(maxsize=16)
def _runner(fn: Callable, methods: tuple, mode: str, devices: tuple | None) -> parallel.Runner:
  """One compiled runner per (function, methods, mode, devices): jit caches its shapes across calls."""
  step = functools.partial(eval_step, fn=fn, methods=methods)
  return parallel.make_runner(step, mode, devices=devices)


def _host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  labels = np.asarray(batch["label"], np.int32)
  return {
    "image": np.asarray(batch["image"], np.float32),
    "label": labels,
    "mask": np.asarray(batch.get("mask", np.ones(len(labels))), np.float32),
  }


def evaluate(
  fn: Callable,
  variables: Any,
  batches: Iterable[Mapping[str, Any]],
  *,
  key: Array,
  methods: Sequence[str] = DEFAULT_METHODS,
  config: Mapping[str, Any] | None = None,
  progress: bool = True,
  mode: str = "single",
  devices: Sequence[Any] | None = None,
) -> dict[str, float]:
  """Clean (top-1, top-5) and robust accuracy over `batches`: `evaluate_per_example`'s accuracies."""
  return evaluate_per_example(
    fn, variables, batches, key=key, methods=methods, config=config, progress=progress, mode=mode, devices=devices
  )[0]


def evaluate_per_example(
  fn: Callable,
  variables: Any,
  batches: Iterable[Mapping[str, Any]],
  *,
  key: Array,
  methods: Sequence[str] = DEFAULT_METHODS,
  config: Mapping[str, Any] | None = None,
  progress: bool = True,
  mode: str = "single",
  devices: Sequence[Any] | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Clean (top-1, top-5) and robust accuracy over `batches`, and each example's correctness.

  Args:
    fn: `apply_fn(variables, x, train) -> (logits, variables)` (called in eval mode), or, with
      variables=None, `logits_fn(x) -> logits`. Keep the same object across calls to reuse compilations.
    variables: model variables (masked params and batch_stats), or None.
    batches: iterable of {'image': [B, H, W, C] in [0, 1], 'label': [B] int, optional 'mask': [B] float};
      examples with mask 0 (padding) do not count.
    key: PRNG key; each batch and method gets its own fold.
    methods: names of registered methods (`get_method`), run in this order.
    config: per-method setting overrides, e.g. `config_settings(run_config.eval)` or {'pgd_linf': {'steps': 50}}.
    progress: show a tqdm progress bar.
    mode: parallel mode ('single', 'pmap', 'shard_map'); batches must divide over the devices.
    devices: the devices of `mode` (default: see `parallel.make_runner`).

  Returns:
    {'clean': top-1 acc, 'clean_top5': top-5 acc (more than 5 classes), <method>: robust acc under that
     method, 'robust': worst case over all methods (clean when none), 'robust_<norm>': worst case over the
     methods of each norm, 'num_examples': count}; accuracies in [0, 1], NaN with no examples.
    Per example, padding dropped, in the order of `batches` (global batch order on several processes):
    {'index': int [N] (0, 1, ...), 'label': int [N], and bool [N] for each accuracy's name}; the mean of each
    bool column is its accuracy.
  """
  items = tuple((name, tuple(sorted(_settings(name, config).items()))) for name in methods)
  runner = _runner(fn, items, mode, tuple(devices) if devices is not None else None)
  state = runner.put_state({"variables": variables, "key": key, "batch": jnp.int32(0)})
  totals, examples = {}, []
  bar = tqdm(batches, desc="evaluate", disable=not progress)
  for batch in bar:
    state, outputs = runner(state, runner.put_batch(_host_batch(batch)))
    outputs = jax.device_get(outputs)
    if mode == "pmap":  # one copy per local device
      outputs = jax.tree.map(lambda x: x[0], outputs)
    counts = jax.tree.map(float, outputs["counts"])
    examples.append(outputs["examples"])
    totals = {name: totals.get(name, 0.0) + value for name, value in counts.items()}
    seen = max(totals["num_examples"], 1)
    bar.set_postfix(clean=totals["clean"] / seen, robust=totals["robust"] / seen)
  count = totals.pop("num_examples", 0.0)
  if not count:
    return {**dict.fromkeys(["clean", *methods, "robust"], float("nan")), "num_examples": 0.0}, {}
  accuracies = {**{name: total / count for name, total in totals.items()}, "num_examples": count}
  for message in masking_warnings(accuracies, methods):
    warnings.warn(message, stacklevel=2)
  return accuracies, _unpadded_examples(examples, methods)


def masking_warnings(results: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
  """One warning per ensemble method (AutoAttack) of `results` whose black-box stage (Square) broke examples
  that every white-box attack before it left robust: the symptom of gradient masking (obfuscated gradients)."""
  found = []
  for name in methods:
    fraction = results.get(f"{name}_masking", 0.0)
    if get_method(name).kind == "ensemble" and fraction > 0:
      count = round(fraction * results["num_examples"])
      found.append(
        f"{name}: Square broke {count} example(s) that every white-box attack before it left robust "
        f"({fraction:.2%} of the test set): the gradients may be masked, so white-box numbers overstate robustness"
      )
  return found


def _column_rank(name: str, methods: Sequence[str]) -> tuple:
  """Columns in reading order: label, clean ones, each method's in the order run, the worst cases, 'robust'."""
  if name == "label" or name.startswith("clean"):
    return (name != "label", name)
  if name.startswith("robust"):
    return (3, name == "robust", name)
  owners = [(len(m), i) for i, m in enumerate(methods) if name == m or name.startswith(f"{m}_")]
  index = max(owners)[1]  # the longest method name it starts with ('autoattack_l2_square': 'autoattack_l2')
  part = name[len(methods[index]) + 1 :]
  return (2, index, name != methods[index], autoattack.COLUMN_ORDER.get(part, -1), name)


def _unpadded_examples(batches: list[dict[str, np.ndarray]], methods: Sequence[str]) -> dict[str, np.ndarray]:
  """The per-example arrays of `batches` concatenated, without padding (mask 0), with 'index' 0..N-1 in front."""
  kept = np.concatenate([b["mask"] for b in batches]) > 0
  names = sorted((name for name in batches[0] if name != "mask"), key=lambda name: _column_rank(name, methods))
  columns = {name: np.concatenate([b[name] for b in batches])[kept] for name in names}
  return {"index": np.arange(int(kept.sum())), **columns}


# ----------------------------------------------------------------------------------------------------------
# Minimum-norm attacks and security curves.

FMN_DEFAULTS = dict(steps=100, max_stepsize=1.0, gamma=0.05)


def min_norm_step(
  state: dict[str, PyTree], batch: dict[str, Array], *, fn: Callable, settings: tuple, axis_name: str | None
) -> tuple[dict, dict[str, dict[str, Array]]]:
  """Per-device step of `min_norms`: each example's clean correctness and FMN's smallest adversarial norm, gathered
  over devices in global batch order (FMN draws nothing at random, so no key is needed)."""
  variables = state["variables"]
  logits_fn = fn if variables is None else (lambda x: fn(variables, x, False)[0])
  x, y = batch["image"], batch["label"]
  _, norms = min_norm.fmn(attacks.in_chunks(logits_fn, 0), x, y, **dict(settings))
  clean = top_k_correct(logits_fn(x), y, 1)
  examples = {"label": y, "mask": batch["mask"], "clean": clean, "min_norm": jnp.where(clean, norms, 0.0)}
  if axis_name is not None:
    examples = jax.lax.all_gather(examples, axis_name, tiled=True)
  return state, {"examples": examples}


@functools.lru_cache(maxsize=8)
def _min_norm_runner(fn: Callable, settings: tuple, mode: str, devices: tuple | None) -> parallel.Runner:
  return parallel.make_runner(functools.partial(min_norm_step, fn=fn, settings=settings), mode, devices=devices)


def min_norms(
  fn: Callable,
  variables: Any,
  batches: Iterable[Mapping[str, Any]],
  *,
  norm: str = "linf",
  settings: Mapping[str, Any] | None = None,
  progress: bool = True,
  mode: str = "single",
  devices: Sequence[Any] | None = None,
) -> dict[str, np.ndarray]:
  """Each example's smallest adversarial perturbation found by FMN (`min_norm.fmn`) in `norm`, over `batches`,
  one program per batch like `evaluate_per_example` (on one device or data-parallel, padding dropped).

  Returns:
    {'index': int [N], 'label': int [N], 'clean': bool [N], 'min_norm': float [N]} with min_norm 0 for examples
    misclassified clean and inf where FMN found no adversarial point; `robust_curve` turns it into robust
    accuracy against eps.
  """
  items = tuple(sorted({**FMN_DEFAULTS, **(settings or {}), "norm": norm}.items()))
  runner = _min_norm_runner(fn, items, mode, tuple(devices) if devices is not None else None)
  state = runner.put_state({"variables": variables})
  examples = []
  for batch in tqdm(batches, desc="min norms", disable=not progress):
    state, outputs = runner(state, runner.put_batch(_host_batch(batch)))
    outputs = jax.device_get(outputs)
    if mode == "pmap":
      outputs = jax.tree.map(lambda x: x[0], outputs)
    examples.append(outputs["examples"])
  if not examples:
    return {}
  kept = np.concatenate([b["mask"] for b in examples]) > 0
  columns = {name: np.concatenate([b[name] for b in examples])[kept] for name in ("label", "clean", "min_norm")}
  return {"index": np.arange(int(kept.sum())), **columns}


def robust_curve(norms: np.ndarray, eps: Sequence[float]) -> np.ndarray:
  """Robust accuracy at each eps from per-example smallest adversarial norms (`min_norm.robust_curve`)."""
  return min_norm.robust_curve(norms, np.asarray(eps))
