"""HYDRA on ImageNet with free adversarial training (reference configs_imagenet.yml, train_imagenet.py).

Run:
  hydra-jax train --config configs/imagenet.py --config.stage=all --config.data.data_dir=/data/imagenet \
      --workdir runs/imagenet_resnet50

ResNet-50 (torchvision layout, ImageNet normalisation inside the model), free AT with m=4 replays (90 epochs
become ceil(90 / 4) = 23 passes, as the reference), eps 4/255, evaluation PGD-10 with step 1/255, batch 256,
SGD lr 0.1 cosine, weight decay 1e-4. data_dir holds ImageNet as torchvision's class folders (train/<wnid>/,
val/<wnid>/, as the reference reads it) or as TFDS imagenet2012 ArrayRecord files (see the README).
Argument: model (default resnet50_imagenet).
"""

from hydra_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_config_arg(arg, model="resnet50_imagenet")
  config = config_lib.default_config()
  config.model.name = args.model
  config.data.name = "imagenet2012"
  config.data.batch_size = config.data.eval_batch_size = 256
  config.data.workers = 8
  config.objective.name = "free"
  config.objective.replays = 4
  for section in (config.objective, config.eval):
    section.eps, section.step_size = 4 / 255, 1 / 255
  for stage in ("pretrain", "finetune"):
    config.stages[stage].epochs = 90
  config.stages.prune.epochs = 20
  config.stages.finetune.lr = 0.01
  config.ks = (0.05, 0.01)
  return config
