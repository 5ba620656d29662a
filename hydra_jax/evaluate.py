"""Robust-accuracy evaluation: clean, PGD, APGD-CE/DLR, targeted APGD-DLR and their per-example worst case.

`evaluate` runs every requested attack on every batch (each attack jit-compiled once per batch shape,
cached across calls for the same function object) and reports accuracies over the non-padded examples.
An example counts as robust under an attack when it is classified correctly both clean and at the
attack's output; the headline `robust` accuracy is the per-example worst case over all attacks run (and
`robust_linf` / `robust_l2` over the attacks of one threat model). Unlike AutoAttack, every attack runs on
the whole batch (not only on still-robust points), which keeps shapes static; the worst case is the same.

Usage:

  config = evaluate.default_config(linf_eps=8 / 255)    # one entry of attack settings per method
  config.pgd_linf.steps, config.pgd_linf.restarts = 50, 5
  results = evaluate.evaluate(apply_fn, variables, test_batches, key=jax.random.key(0),
                              methods=('pgd_linf', 'apgd_ce', 'apgd_dlr', 'apgd_t'), config=config)
  print(results['clean'], results['robust'], results['apgd_ce'])

`apply_fn(variables, x, train) -> (logits, variables)` is called with train=False; pass `variables=None`
to give a `logits_fn(x) -> logits` instead.
"""

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from hydra_jax import attacks

Array = jax.Array


class Method(NamedTuple):
  """An evaluation attack: `attack(logits_fn, x, y, key=..., **settings) -> x_adv` and its default settings."""

  attack: Callable[..., Array]
  defaults: Mapping[str, Any]


_METHODS: dict[str, Method] = {}


def register_method(name: str, attack: Callable[..., Array], defaults: Mapping[str, Any]) -> None:
  """Registers an evaluation method; `defaults` must include 'norm' and 'eps'."""
  if name in _METHODS or name == "clean":
    raise ValueError(f"evaluation method {name!r} is already registered")
  if not {"norm", "eps"} <= set(defaults):
    raise ValueError(f"evaluation method {name!r}: defaults need 'norm' and 'eps', got {sorted(defaults)}")
  _METHODS[name] = Method(attack, dict(defaults))


register_method("pgd_linf", attacks.pgd, dict(norm="linf", eps=8 / 255, step_size=2 / 255, steps=20, restarts=1))
register_method("pgd_l2", attacks.pgd, dict(norm="l2", eps=0.5, step_size=0.125, steps=20, restarts=1))
register_method("apgd_ce", attacks.apgd, dict(norm="linf", eps=8 / 255, steps=100, loss="ce", restarts=1))
register_method("apgd_dlr", attacks.apgd, dict(norm="linf", eps=8 / 255, steps=100, loss="dlr", restarts=1))
register_method("apgd_t", attacks.apgd_targeted,
                dict(norm="linf", eps=8 / 255, steps=100, num_targets=9, restarts=1))

DEFAULT_METHODS = ("pgd_linf", "apgd_ce", "apgd_dlr")


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
    settings["eps"] = {"linf": linf_eps, "l2": l2_eps}[settings["norm"]]
    if "step_size" in settings:
      settings["step_size"] = settings["eps"] / 4
    config[name] = settings
  return config


def _settings(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
  """The method's defaults overridden by config[name]; unknown setting names raise ValueError."""
  method = get_method(name)
  overrides = dict(config.get(name, {})) if config is not None else {}
  valid = {p.name for p in inspect.signature(method.attack).parameters.values()
           if p.kind == inspect.Parameter.KEYWORD_ONLY} - {"key"}
  unknown = set(overrides) - valid
  if unknown:
    raise ValueError(f"method {name!r}: unknown settings {sorted(unknown)}; valid: {sorted(valid)}")
  return {**method.defaults, **overrides}


def _logits_fn(fn: Callable, variables: Any) -> attacks.LogitsFn:
  if variables is None:
    return fn
  return lambda x: fn(variables, x, False)[0]


def _is_correct(logits: Array, labels: Array) -> Array:
  return jnp.argmax(logits, axis=-1) == labels


@functools.partial(jax.jit, static_argnames=("fn",))
def _clean_correct(fn, variables, x, y):
  return _is_correct(_logits_fn(fn, variables)(x), y)


@functools.partial(jax.jit, static_argnames=("fn", "name", "settings"))
def _attack_correct(fn, variables, x, y, key, name, settings):
  """Correctness [B] at the output of method `name` with `settings` (a sorted tuple of items)."""
  logits_fn = _logits_fn(fn, variables)
  x_adv = get_method(name).attack(logits_fn, x, y, key=key, **dict(settings))
  return _is_correct(logits_fn(x_adv), y)


def evaluate(
    fn: Callable,
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    key: Array,
    methods: Sequence[str] = DEFAULT_METHODS,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, float]:
  """Clean and robust accuracy over `batches`.

  Args:
    fn: `apply_fn(variables, x, train) -> (logits, variables)` (called in eval mode), or, with
      variables=None, `logits_fn(x) -> logits`. Keep the same object across calls to reuse compilations.
    variables: model variables (masked params and batch_stats), or None.
    batches: iterable of {'image': [B, H, W, C] in [0, 1], 'label': [B] int, optional 'mask': [B] float};
      examples with mask 0 (padding) do not count.
    key: PRNG key; each batch and method gets its own fold.
    methods: names of registered methods (`get_method`), run in this order.
    config: per-method setting overrides, e.g. `default_config()` or {'pgd_linf': {'steps': 50}}.
    progress: show a tqdm progress bar.

  Returns:
    {'clean': acc, <method>: robust acc under that method, 'robust': worst case over all methods,
     'robust_<norm>': worst case over the methods of each norm, 'num_examples': count}; accuracies in
    [0, 1]. With no examples the accuracies are NaN.
  """
  settings = {name: _settings(name, config) for name in methods}
  norms = sorted({s["norm"] for s in settings.values()})
  totals = dict.fromkeys(["clean", *methods, "robust", *(f"robust_{n}" for n in norms)], 0.0)
  count = 0.0
  bar = tqdm(batches, desc="evaluate", disable=not progress)
  for index, batch in enumerate(bar):
    x = jnp.asarray(batch["image"], jnp.float32)
    y = jnp.asarray(batch["label"], jnp.int32)
    weight = np.asarray(batch.get("mask", np.ones(y.shape[0])), np.float64)
    clean = np.asarray(_clean_correct(fn, variables, x, y))
    robust = {"robust": clean, **{f"robust_{n}": clean for n in norms}}
    totals["clean"] += float(weight @ clean)
    batch_key = jax.random.fold_in(key, index)
    for m, name in enumerate(methods):
      correct = clean & np.asarray(_attack_correct(fn, variables, x, y, jax.random.fold_in(batch_key, m), name,
                                                   tuple(sorted(settings[name].items()))))
      totals[name] += float(weight @ correct)
      for group in ("robust", f"robust_{settings[name]['norm']}"):
        robust[group] = robust[group] & correct
    for group, correct in robust.items():
      totals[group] += float(weight @ correct)
    count += float(weight.sum())
    bar.set_postfix(clean=totals["clean"] / max(count, 1), robust=totals["robust"] / max(count, 1))
  results = {name: total / count if count else float("nan") for name, total in totals.items()}
  results["num_examples"] = count
  return results
