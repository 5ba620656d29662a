"""Training objectives: benign, PGD AT, TRADES, free AT, smoothing, verified (CROWN-IBP, IBP, MixTrain).

An objective loss is a pure function

  loss_fn(apply_fn, variables, batch, key, config[, carry][, epoch=epoch]) -> (loss, (metrics, variables))

with `apply_fn(variables, x, train) -> (logits, variables)` (train=True uses batch statistics and returns
updated BN running stats), `variables = {'params': masked params, 'batch_stats': ...}` (the train step
masks the params once before calling; objectives never mask), `batch = {'image': [B, H, W, C] in [0, 1],
'label': [B] int32}`, `config` the objective's plain ConfigDict (see `default_config`), `metrics` a dict of
scalar batch means and the returned `variables` carrying the BN running stats after the objective's
train-mode forwards. Attacks run in eval mode on gradient-stopped variables, as the reference runs them
in `model.eval()`, so examples do not interact and the attacks of `pgd_at` and `trades` run in batch chunks
of `config.attack_chunk_size` examples (`attacks.in_chunks`; 0, the default: 32 on CPU, where it is faster,
the whole batch elsewhere). `key` seeds the objective's randomness (attack start or noise): the same key on
every device, each example drawing from fold_in(key, its position in the global batch), `batch['index']`
(int32 [B], added by the train step with `batch['global_batch_size']`; absent: the batch is the global one),
so that results do not depend on the device count.

Stateful objectives (`free`) also take a `carry` (the perturbation) as last argument. The train step
differentiates the loss with respect to (trainable params, carry) in one backward pass, applies the
optimizer, then calls `update_carry`; it does so `replays(config)` times per batch and resets the carry
with `init_carry` at each epoch start. Stateless objectives have `init_carry=None` and one replay.

Objectives with schedules (`crown_ibp`, `ibp`, `mixtrain`; `takes_epoch=True`) take `epoch=` as a keyword:
a float32 scalar, the fractional epochs done in the stage; their eps (and beta, kappa, interval weight)
follow from it (`crown_ibp_ramp`, `mixtrain_schedule`).

Usage:

  objective = objectives.get_objective('trades')
  config = objectives.default_config('trades')          # eps 8/255, step 2/255, 10 steps, beta 6
  grad_fn = jax.value_and_grad(objective.loss_fn, argnums=1, has_aux=True)
  (loss, (metrics, new_variables)), grads = grad_fn(apply_fn, variables, batch, key, config)

A new objective is one function registered by name:

  @objectives.register('my_loss', defaults={'beta': 1.0})
  def my_loss(apply_fn, variables, batch, key, config): ...
"""

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from hydra_jax import attacks
from hydra_jax import bounds

Array = jax.Array
Variables = Mapping[str, Any]
ApplyFn = Callable[[Variables, Array, bool], tuple[Array, Variables]]
Batch = Mapping[str, Array]
LossOutput = tuple[Array, tuple[dict[str, Array], Variables]]


class Objective(NamedTuple):
  """A registered training objective.

  Attributes:
    loss_fn: `(apply_fn, variables, batch, key, config[, carry]) -> (loss, (metrics, variables))`.
    defaults: default config values (plain data), without 'name'.
    init_carry: `(batch_shape, config) -> carry` for stateful objectives, else None.
    update_carry: `(carry, carry_grad, config) -> carry` for stateful objectives, else None.
    replays: `config -> int`, optimizer steps per batch (1 for stateless objectives).
    takes_epoch: the loss also takes `epoch=` (keyword), a float32 scalar: the fractional number of epochs
      of the stage done at this step (step / steps_per_epoch), e.g. for an eps or interval-weight schedule.
  """

  loss_fn: Callable[..., LossOutput]
  defaults: Mapping[str, Any]
  init_carry: Callable[[tuple[int, ...], ml_collections.ConfigDict], Array] | None = None
  update_carry: Callable[[Array, Array, ml_collections.ConfigDict], Array] | None = None
  replays: Callable[[ml_collections.ConfigDict], int] = lambda config: 1
  takes_epoch: bool = False


_REGISTRY: dict[str, Objective] = {}


def register(
  name: str, *, defaults: Mapping[str, Any], init_carry=None, update_carry=None, replays=None, takes_epoch: bool = False
):
  """Decorator registering `loss_fn` under `name` (see `Objective` for the other arguments)."""
  if name in _REGISTRY:
    raise ValueError(f"objective {name!r} is already registered")
  if (init_carry is None) != (update_carry is None):
    raise ValueError(f"objective {name!r}: give both init_carry and update_carry, or neither")

  def decorator(loss_fn):
    extra = {} if replays is None else {"replays": replays}
    _REGISTRY[name] = Objective(loss_fn, dict(defaults), init_carry, update_carry, **extra, takes_epoch=takes_epoch)
    return loss_fn

  return decorator


def objective_names() -> list[str]:
  """The registered objective names, sorted."""
  return sorted(_REGISTRY)


def get_objective(name: str) -> Objective:
  """Returns the objective registered as `name`; raises ValueError listing the valid names."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown objective {name!r}; valid objectives: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def default_config(name: str) -> ml_collections.ConfigDict:
  """The objective's default config: {'name': name, **defaults}."""
  return ml_collections.ConfigDict({"name": name, **get_objective(name).defaults})


# ----------------------------------------------------------------------------------------------------------
# Small helpers.


def _eval_logits_fn(apply_fn: ApplyFn, variables: Variables, config: ml_collections.ConfigDict) -> attacks.LogitsFn:
  """Eval-mode logits on gradient-stopped variables, in batch chunks of `config.attack_chunk_size`
  (`attacks.in_chunks`; 0 or absent: the backend's default): what the attacks see."""
  frozen = lax.stop_gradient(variables)
  return attacks.in_chunks(lambda x: apply_fn(frozen, x, False)[0], config.get("attack_chunk_size", 0))


def _positions(batch: Batch) -> tuple[Array, Array]:
  """(int32 [B] positions of the batch's examples in the global batch, global batch size)."""
  size = batch["image"].shape[0]
  return batch.get("index", jnp.arange(size, dtype=jnp.int32)), batch.get("global_batch_size", jnp.int32(size))


def _example_keys(key: Array, batch: Batch) -> Array:
  """Per-example keys [B] (`attacks.example_keys`) from the examples' positions in the global batch."""
  return attacks.example_keys(key, _positions(batch)[0])


def _accuracy(logits: Array, labels: Array) -> Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def _cross_entropy(logits: Array, labels: Array) -> Array:
  return jnp.mean(attacks.cross_entropy(logits, labels))


def _kl(natural_logits: Array, other_logits: Array) -> Array:
  """(1/B) sum_b KL(softmax natural || softmax other): the reference's (1/B) * KLDivLoss(size_average=False)."""
  return jnp.mean(attacks.kl_divergence(other_logits, jax.nn.softmax(natural_logits, axis=-1)))


_ATTACK_DEFAULTS = dict(
  eps=8 / 255, step_size=2 / 255, steps=10, norm="linf", unroll=attacks.DEFAULT_UNROLL, attack_chunk_size=0
)


# ----------------------------------------------------------------------------------------------------------
# Objectives.


@register("benign", defaults={})
def benign_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict
) -> LossOutput:
  """Cross-entropy on clean inputs (the reference's `base` trainer). `key` and `config` are unused."""
  del key, config
  logits, variables = apply_fn(variables, batch["image"], True)
  loss = _cross_entropy(logits, batch["label"])
  return loss, ({"loss": loss, "accuracy": _accuracy(logits, batch["label"])}, variables)


@register("pgd_at", defaults={**_ATTACK_DEFAULTS, "random_start": True})
def pgd_at_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict
) -> LossOutput:
  """Madry et al. adversarial training: CE on PGD examples (not in the reference, whose `adv` is TRADES).

  PGD (`attacks.pgd` with config eps, step_size, steps, norm, random_start; `key` seeds the random start)
  runs in eval mode; the loss forward on x_adv runs in train mode, so BN statistics see adversarial
  inputs only. metrics: loss, accuracy (clean inputs, eval-mode forward), adv_accuracy (train mode).
  """
  x, y = batch["image"], batch["label"]
  logits_fn = _eval_logits_fn(apply_fn, variables, config)
  x_adv = attacks.pgd(
    logits_fn,
    x,
    y,
    key=_example_keys(key, batch),
    eps=config.eps,
    step_size=config.step_size,
    steps=config.steps,
    norm=config.norm,
    random_start=config.random_start,
    unroll=config.unroll,
  )
  adv_logits, variables = apply_fn(variables, x_adv, True)
  loss = _cross_entropy(adv_logits, y)
  metrics = {"loss": loss, "accuracy": _accuracy(logits_fn(x), y), "adv_accuracy": _accuracy(adv_logits, y)}
  return loss, (metrics, variables)


@register("trades", defaults={**_ATTACK_DEFAULTS, "beta": 6.0})
def trades_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict
) -> LossOutput:
  """TRADES (Zhang et al. 2019), exactly the reference's trainer called `adv` (which IS TRADES).

  L = CE(f(x), y) + beta * (1/B) sum_b KL(softmax f(x) || softmax f(x_adv)), beta = 6 by default, where
  x_adv = `attacks.trades_attack` (eval mode, start x + 0.001 N(0, I) drawn from `key`, config eps,
  step_size, steps, norm) and f runs in train mode. Nothing is detached: gradients reach both f(x) terms.

  BN running statistics are updated as in the reference, which forwards x, x, x_adv, x in train mode (one
  forward for logging, two inside `trades_loss`). The train-mode logits of x do not depend on the running
  statistics, so one differentiated forward of x serves CE, the KL target and the logged accuracy; the
  other two forwards of x only advance the running statistics (two extra forwards, a few percent of a
  10-step TRADES step).
  metrics: loss, natural_loss, robust_loss (the KL term before beta), accuracy, adv_accuracy (train mode).
  """
  x, y = batch["image"], batch["label"]
  x_adv = attacks.trades_attack(
    _eval_logits_fn(apply_fn, variables, config),
    x,
    key=_example_keys(key, batch),
    eps=config.eps,
    step_size=config.step_size,
    steps=config.steps,
    norm=config.norm,
    unroll=config.unroll,
  )
  logits, variables = apply_fn(variables, x, True)
  _, variables = apply_fn(variables, x, True)
  adv_logits, variables = apply_fn(variables, x_adv, True)
  _, variables = apply_fn(variables, x, True)
  natural_loss, robust_loss = _cross_entropy(logits, y), _kl(logits, adv_logits)
  loss = natural_loss + config.beta * robust_loss
  metrics = {
    "loss": loss,
    "natural_loss": natural_loss,
    "robust_loss": robust_loss,
    "accuracy": _accuracy(logits, y),
    "adv_accuracy": _accuracy(adv_logits, y),
  }
  return loss, (metrics, variables)


@register("smooth", defaults={"noise_std": 0.25, "beta": 6.0})
def smooth_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict
) -> LossOutput:
  """The reference's `smooth` trainer (non-ImageNet): a stability loss for randomized smoothing.

  L = CE(f(x), y) + beta * (1/B) sum_b KL(softmax f(x) || softmax f(x + delta)), delta = noise_std * N(0, I)
  drawn from `key` (not clipped, as in the reference), both forwards in train mode (x first), nothing
  detached. metrics: loss, natural_loss, robust_loss, accuracy, noisy_accuracy.
  """
  x, y = batch["image"], batch["label"]
  noise = config.noise_std * attacks.draw(jax.random.normal, _example_keys(key, batch), x.shape, x.dtype)
  logits, variables = apply_fn(variables, x, True)
  noisy_logits, variables = apply_fn(variables, x + noise, True)
  natural_loss, robust_loss = _cross_entropy(logits, y), _kl(logits, noisy_logits)
  loss = natural_loss + config.beta * robust_loss
  metrics = {
    "loss": loss,
    "natural_loss": natural_loss,
    "robust_loss": robust_loss,
    "accuracy": _accuracy(logits, y),
    "noisy_accuracy": _accuracy(noisy_logits, y),
  }
  return loss, (metrics, variables)


@register("smooth_imagenet", defaults={"noise_std": 0.25})
def smooth_imagenet_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict
) -> LossOutput:
  """The reference's `smooth` trainer on ImageNet: Gaussian data augmentation (Cohen et al. 2019).

  L = CE(f(x + delta), y), delta = noise_std * N(0, I) drawn from `key`, one forward in train mode, no
  clean forward. The reference adds noise_std * N(0, I) / std_c to inputs normalised by the channel std
  std_c, which is noise_std * N(0, I) in pixel units: hydra_jax models take [0, 1] pixels (the ImageNet
  ResNets normalise inside), so the noise is added to the pixels, unclipped, and the model is certified with
  `smoothing.certify` at sigma = noise_std. (This matches the reference run with --normalize; with its
  default, unnormalised inputs, the reference's pixel noise has std noise_std / std_c, about 4.4x larger.)
  metrics: loss, accuracy and noisy_accuracy (both on x + delta, the only forward, as the reference logs).
  """
  x, y = batch["image"], batch["label"]
  noise = config.noise_std * attacks.draw(jax.random.normal, _example_keys(key, batch), x.shape, x.dtype)
  noisy_logits, variables = apply_fn(variables, x + noise, True)
  loss = _cross_entropy(noisy_logits, y)
  accuracy = _accuracy(noisy_logits, y)
  return loss, ({"loss": loss, "accuracy": accuracy, "noisy_accuracy": accuracy}, variables)


# Free adversarial training (Shafahi et al. 2019), the reference's `freeadv` trainer.


def free_init_carry(batch_shape: tuple[int, ...], config: ml_collections.ConfigDict) -> Array:
  """A zero perturbation of shape batch_shape [B, H, W, C]; the reference re-creates it at each epoch."""
  del config
  return jnp.zeros(batch_shape, jnp.float32)


def free_update_carry(carry: Array, carry_grad: Array, config: ml_collections.ConfigDict) -> Array:
  """delta <- clip(delta + eps * sign(dL/d delta), -eps, eps) (step eps, not step_size, as the reference)."""
  return jnp.clip(carry + config.eps * jnp.sign(carry_grad), -config.eps, config.eps)


@register(
  "free",
  defaults={"eps": 8 / 255, "replays": 4},
  init_carry=free_init_carry,
  update_carry=free_update_carry,
  replays=lambda config: config.replays,
)
def free_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict, carry: Array
) -> LossOutput:
  """Free adversarial training: CE(f(clip(x + delta, 0, 1)), y) in train mode.

  The perturbation delta is the carry, shared across replays and batches; the train step takes the
  gradient with respect to it in the same backward pass as the params and calls `free_update_carry`. Each
  batch is replayed `config.replays` (m = 4) times; to keep the total number of optimizer steps, the
  reference divides the epochs by m (ImageNet: 90 -> ceil(90 / 4) = 23, eps 4/255), which is for the
  train config. A batch smaller than the carry uses its first B rows (the others get a zero gradient and
  stay unchanged), as the reference does. Inputs are not normalised here (the reference normalises
  inside the loop; hydra_jax models take [0, 1] inputs). `key` is unused.
  metrics: loss, accuracy (on the perturbed input, which is what the reference logs; there is no clean
  forward), adv_accuracy (the same value, so adversarial objectives share the key).
  """
  del key
  x, y = batch["image"], batch["label"]
  if carry.shape[1:] != x.shape[1:] or carry.shape[0] < x.shape[0]:
    raise ValueError(f"free: carry shape {carry.shape} does not fit the batch images {x.shape}")
  logits, variables = apply_fn(variables, attacks.clip_box(x + carry[: x.shape[0]]), True)
  loss = _cross_entropy(logits, y)
  accuracy = _accuracy(logits, y)
  return loss, ({"loss": loss, "accuracy": accuracy, "adv_accuracy": accuracy}, variables)


# ----------------------------------------------------------------------------------------------------------
# Verified training: CROWN-IBP, IBP (reference trainer/crown-ibp.py) and MixTrain (trainer/mixtrain.py).
#
# Bounds are computed on the eval-mode logits function of the current (masked) weights, over the l_inf ball
# clipped to [clip_min, clip_max] (the reference clips to the batch's min / max). With BatchNorm this uses
# the running statistics, so BN is a fixed per-channel affine map inside the bounds; the natural forward
# runs in train mode and updates the running statistics as in every other objective. The reference's
# verified models (cnn_small / cnn_large) have no BatchNorm; CROWN-IBP and MixTrain need such chain models
# (affine -> ReLU -> ... -> affine), IBP works for every zoo model.

_VERIFIED_DEFAULTS = {"eps": 0.007, "starting_epsilon": 0.0, "clip_min": 0.0, "clip_max": 1.0}
_CROWN_IBP_DEFAULTS = {
  **_VERIFIED_DEFAULTS,
  "schedule_length": 60,
  "kappa_start": 0.0,
  "kappa_end": 0.0,
  "lower_slope": "adaptive",
}


def crown_ibp_ramp(epoch: Array, schedule_length: int) -> Array:
  """Fraction of the eps ramp done after `epoch` fractional epochs: min(epoch / (L - 1), 1), 1 if L <= 1.

  This is the reference's EpsilonScheduler("linear") stepped per batch with init_step 0 (schedule_start) and
  final_step (L - 1) * steps_per_epoch: eps reaches its final value after L - 1 epochs, and a schedule of
  length 1 (the reference's prune stage) uses the final eps from the start.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  if schedule_length <= 1:
    return jnp.ones_like(epoch)
  return jnp.clip(epoch / (schedule_length - 1), 0.0, 1.0)


def _worst_case_logits(margin_lb: Array, spec: Array, labels: Array) -> Array:
  """[B, K] with -lb(z_y - z_j) at j != y and 0 at y: the reference's scattered -lb (CE of it is the loss)."""
  scattered = jnp.einsum("bm,bmk->bk", margin_lb, spec)  # -lb at each j, sum(lb) at y
  return jnp.where(jax.nn.one_hot(labels, spec.shape[-1], dtype=bool), 0.0, scattered)


def _ball(x: Array, eps: Array, config: ml_collections.ConfigDict) -> tuple[Array, Array]:
  return jnp.clip(x - eps, config.clip_min, config.clip_max), jnp.clip(x + eps, config.clip_min, config.clip_max)


def _verified_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, config: ml_collections.ConfigDict, epoch: Array, crown: bool
) -> LossOutput:
  """L = kappa CE(f(x), y) + (1 - kappa) CE(-lb, y) (CROWN-IBP paper, eq. 9), lb mixed as in `crown_ibp_loss`."""
  x, y = batch["image"], batch["label"]
  logits, new_variables = apply_fn(variables, x, True)
  ramp = crown_ibp_ramp(epoch, config.schedule_length)
  eps = config.starting_epsilon + (config.eps - config.starting_epsilon) * ramp
  kappa = config.kappa_start + (config.kappa_end - config.kappa_start) * ramp
  f = lambda inputs: apply_fn(variables, inputs, False)[0]
  lower, upper = _ball(x, eps, config)
  spec = bounds.margin_spec(y, logits.shape[-1])
  beta = 1.0 - eps / config.eps if crown else jnp.zeros(())

  def mixed():
    ibp_lb, crown_lb = bounds.ibp_and_crown_lower(f, lower, upper, spec, lower_slope=config.lower_slope)
    return beta * crown_lb + (1 - beta) * ibp_lb

  ibp_only = lambda: bounds.ibp(f, lower, upper, spec)[0]
  lb = lax.cond(beta < 1e-5, ibp_only, mixed) if crown else ibp_only()
  natural_loss, robust_loss = _cross_entropy(logits, y), _cross_entropy(_worst_case_logits(lb, spec, y), y)
  loss = kappa * natural_loss + (1 - kappa) * robust_loss
  metrics = {
    "loss": loss,
    "natural_loss": natural_loss,
    "robust_loss": robust_loss,
    "accuracy": _accuracy(logits, y),
    "verified_accuracy": jnp.mean(jnp.all(lb > 0, axis=-1)),
    "eps": eps,
    "beta": beta,
    "kappa": kappa,
  }
  return loss, (metrics, new_variables)


@register("crown_ibp", defaults=_CROWN_IBP_DEFAULTS, takes_epoch=True)
def crown_ibp_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict, epoch: Array
) -> LossOutput:
  """CROWN-IBP verified training (Zhang et al. 2020), the reference's `crown-ibp` trainer.

  eps_t = starting_epsilon + (eps - starting_epsilon) * `crown_ibp_ramp(epoch, schedule_length)` (per step);
  lb = beta * crown_lb + (1 - beta) * ibp_lb on the margins z_y - z_j over the clipped eps_t-ball, with
  beta = 1 - eps_t / eps (so CROWN-IBP at the start, pure IBP once eps_t = eps, when CROWN is skipped: the
  reference's beta < 1e-5 test); L = CE(-lb, y) with 0 at y. kappa_start = kappa_end = 0 (default) is the
  reference; kappa_start=1, kappa_end=0 (or 0.5) is the paper's kappa-mixed form, kappa ramped like eps.
  lower_slope: the CROWN lower ReLU slope, "adaptive" (reference) or "zero". `key` is unused.
  metrics: loss, natural_loss, robust_loss, accuracy (clean, train mode), verified_accuracy (all lb > 0),
  eps, beta, kappa.
  """
  del key
  return _verified_loss(apply_fn, variables, batch, config, epoch, crown=True)


@register("ibp", defaults={k: v for k, v in _CROWN_IBP_DEFAULTS.items() if k != "lower_slope"}, takes_epoch=True)
def ibp_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict, epoch: Array
) -> LossOutput:
  """IBP verified training (Gowal et al. 2018): `crown_ibp` with beta = 0 (lb = ibp_lb), for any zoo model."""
  del key
  return _verified_loss(apply_fn, variables, batch, config, epoch, crown=False)


def mixtrain_schedule(epoch: Array, config: ml_collections.ConfigDict) -> tuple[Array, Array]:
  """MixTrain's per-epoch (eps, interval weight) at integer epoch e = floor(epoch) (reference set_epsilon, ...).

  eps = starting_epsilon + e (eps - starting_epsilon) / L while e < L, then eps;
  iw = min(interval_weight * 2.5^floor(max(e - L, 0) / 5), 50), L = schedule_length.
  """
  e = jnp.floor(jnp.asarray(epoch, jnp.float32))
  length = config.schedule_length
  ramped = config.starting_epsilon + e * (config.eps - config.starting_epsilon) / max(length, 1)
  eps = jnp.where(e < length, ramped, config.eps)
  weight = config.interval_weight * 2.5 ** jnp.floor(jnp.maximum(e - length, 0) / 5)
  return eps, jnp.minimum(weight, 50.0)


@register(
  "mixtrain",
  defaults={**_VERIFIED_DEFAULTS, "schedule_length": 10, "interval_weight": 0.1, "mixtraink": 1, "alpha": 0.8},
  takes_epoch=True,
)
def mixtrain_loss(
  apply_fn: ApplyFn, variables: Variables, batch: Batch, key: Array, config: ml_collections.ConfigDict, epoch: Array
) -> LossOutput:
  """MixTrain (Wang et al. 2018), the reference's `mixtrain` trainer.

  L = CE(f(x), y) (train mode) and, with probability alpha = 0.8 (one coin per step, drawn from `key`), plus
  iw * CE of the symbolic-interval worst-case logits (`bounds.symbolic_interval` on the margins, 0 at y) of
  `mixtraink` examples drawn uniformly with replacement from the global batch; eps and iw from
  `mixtrain_schedule`. Data-parallel, each device bounds the chosen examples it holds (the symbolic pass runs
  only when the coin falls and the device holds one, lax.cond) and scales its sum so that the mean over
  devices is the mean over the k examples. metrics: loss, natural_loss, robust_loss (0 when not drawn; the
  device's share before the mean over devices), accuracy, eps, interval_weight, drawn.
  """
  x, y = batch["image"], batch["label"]
  logits, new_variables = apply_fn(variables, x, True)
  eps, weight = mixtrain_schedule(epoch, config)
  draw_key, index_key = jax.random.split(key)
  drawn = jax.random.uniform(draw_key) <= config.alpha
  positions, global_size = _positions(batch)
  chosen = jax.random.randint(index_key, (config.mixtraink,), 0, global_size)  # positions in the global batch
  rows, mine = (
    jnp.clip(chosen - positions[0], 0, x.shape[0] - 1),
    (chosen >= positions[0]) & (chosen < positions[0] + x.shape[0]),
  )
  f = lambda inputs: apply_fn(variables, inputs, False)[0]

  def robust():  # sum over this device's chosen examples, scaled so that the mean over devices is the mean over k
    lower, upper = _ball(x[rows], eps, config)
    spec = bounds.margin_spec(y[rows], logits.shape[-1])
    lb, _ = bounds.symbolic_interval(f, lower, upper, spec)
    losses = attacks.cross_entropy(_worst_case_logits(lb, spec, y[rows]), y[rows])
    return jnp.sum(jnp.where(mine, losses, 0.0)) * (global_size / x.shape[0]) / config.mixtraink

  robust_loss = lax.cond(drawn & jnp.any(mine), robust, lambda: jnp.zeros(()))
  natural_loss = _cross_entropy(logits, y)
  loss = natural_loss + weight * robust_loss
  metrics = {
    "loss": loss,
    "natural_loss": natural_loss,
    "robust_loss": robust_loss,
    "accuracy": _accuracy(logits, y),
    "eps": eps,
    "interval_weight": weight,
    "drawn": drawn.astype(jnp.float32),
  }
  return loss, (metrics, new_variables)
