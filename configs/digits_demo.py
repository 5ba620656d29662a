"""The offline main job: HYDRA end to end on scikit-learn's digits (ships with scikit-learn, no download).

Run:
  hydra-jax train --config configs/digits_demo.py --workdir runs/digits_demo

Adversarially pretrains CNN-small with TRADES (l_inf eps 0.1 on [0, 1] pixels; the 8x8 digits upsampled to
16x16, which gives the CNN 61k prunable weights instead of 22k), prunes it with HYDRA at k=0.05 and k=0.03 (95%
and 97% pruning, scaled score init), finetunes, runs the LWM baseline at each k, and prints a table of clean /
PGD-10 accuracy and the kept fraction. At 98% LWM falls to chance on this small CNN and at 99% every method does
(each layer keeps k of its weights: 3 of the first convolution's 256); see docs/pipeline.md. Tiny sizes so that it
finishes in a few minutes on 2 CPU cores; not a result of the paper.
Arguments: model (default cnn_small), objective (default trades).
"""

from hydra_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_config_arg(arg, model="cnn_small", objective="trades")
  config = config_lib.default_config()
  config.stage = "all"
  config.ks = (0.05, 0.03)
  config.model.name = args.model
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.batch_size = 64
  config.data.eval_batch_size = 120
  config.objective.name = args.objective
  for section in (config.objective, config.eval):
    section.eps, section.step_size, section.steps = 0.1, 0.025, 10
  config.stages.pretrain.epochs, config.stages.pretrain.lr = 15, 0.05
  config.stages.prune.epochs, config.stages.prune.lr = 5, 0.1
  config.stages.finetune.epochs, config.stages.finetune.lr = 5, 0.01
  config.eval.every_epochs = 5
  config.log.every_steps = 10
  config.checkpoint.keep = 2
  return config
