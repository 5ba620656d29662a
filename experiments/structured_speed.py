"""Inference speed of the compact networks of a channel-granularity `stage=all` run (structured HYDRA and the
channel LWM at each k) against the full network.

Run (after `hydra-jax train --config configs/digits_demo.py --config.mask.granularity=channel
"--config.ks=(0.5, 0.25)" --workdir runs/channel_demo`):

  PYTHONPATH=. python experiments/structured_speed.py --workdir runs/channel_demo --ks 0.5,0.25

Prints, per method and k: parameters, XLA GFLOPs and median jitted eval-mode latency at `--batch` for the
full (masked) and the compact network (`export.load_run(..., compact=True)`), and the max |logit difference|
between them.
"""

import argparse
import functools
import importlib.util
import os

import jax
import numpy as np

from benchmarks.bench_compact import compiled_stats
from benchmarks.bench_compact import num_params
from hydra_jax import config as config_lib
from hydra_jax import export
from hydra_jax import sources

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logits(model, variables, x):
  return model.apply(variables, x, train=False)


def demo_config(k: float):
  """configs/digits_demo.py with channel granularity at `k`."""
  spec = importlib.util.spec_from_file_location("digits_demo", os.path.join(_ROOT, "configs", "digits_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.mask.granularity, config.k = "channel", k
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--ks", default="0.5,0.25")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  print(
    f"{'method':<7} {'k':>5} {'params':>13} {'GFLOPs':>13} {'full ms':>8} {'compact ms':>10} {'speedup':>7} "
    f"{'logit diff':>10}"
  )
  for k in map(float, args.ks.split(",")):
    config = demo_config(k)
    model = sources.build_model(config)
    x = jax.random.uniform(jax.random.key(0), (args.batch, *config_lib.image_shape(config)))
    for method, sub in (("hydra", "finetune"), ("lwm", "lwm/train")):
      workdir = os.path.join(args.workdir, f"k{k:g}", sub)
      full = export.load_run(workdir, config=config).variables
      small = export.load_run(workdir, config=config, compact=True)
      params = f"{num_params({'params': full['params']}):>6d}/{num_params(small.variables):<6d}"
      full_s, full_flops, _ = compiled_stats(functools.partial(_logits, model), full, x, args.repeats)
      small_s, small_flops, _ = compiled_stats(
        functools.partial(_logits, small.module), small.variables, x, args.repeats
      )
      diff = float(np.max(np.abs(np.asarray(small(x[:8])) - np.asarray(model.apply(full, x[:8], train=False)))))
      print(
        f"{method:<7} {k:>5.2f} {params} {full_flops / 1e9:>6.3f}/"
        f"{small_flops / 1e9:<6.3f} {1e3 * full_s:>8.2f} {1e3 * small_s:>10.2f} {full_s / small_s:>7.2f} {diff:>10.1e}"
      )


if __name__ == "__main__":
  main()
