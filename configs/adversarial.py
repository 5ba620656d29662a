"""Adversarial HYDRA on CIFAR-10 / CIFAR-100 / SVHN with any zoo model and objective (reference configs.yml).

Run (one stage at a time, as the reference scripts do):
  hydra-jax train --config configs/adversarial.py:model=wrn_28_4,objective=trades --config.stage=pretrain \
      --workdir runs/wrn_28_4/pretrain
  hydra-jax train --config configs/adversarial.py:model=wrn_28_4 --config.stage=prune --config.k=0.01 \
      --config.source=runs/wrn_28_4/pretrain --workdir runs/wrn_28_4/k0.01/prune
  hydra-jax train --config configs/adversarial.py:model=wrn_28_4 --config.stage=finetune --config.k=0.01 \
      --config.source=runs/wrn_28_4/k0.01/prune --workdir runs/wrn_28_4/k0.01/finetune
or all stages (pretrain, then prune + finetune + the baselines of config.baselines at each k of config.ks) in one job:
  hydra-jax train --config configs/adversarial.py:model=vgg16_bn,dataset=svhn_cropped --config.stage=all \
      --workdir runs/svhn_vgg16

Arguments (comma separated NAME=VALUE):
  model      any zoo name (hydra_jax.models.model_names()), default vgg16_bn.
  dataset    cifar10 | cifar100 | svhn_cropped, default cifar10.
  objective  trades (the reference's `adv` trainer), pgd_at, benign, free, smooth; default trades.
  norm       linf | l2 (training and evaluation threat model), default linf.
  semisup    path to Carmon et al.'s ti_top_50000_pred_v3.1.pickle (the reference's --is-semisup), default none.

Data: --config.data.data_dir=DIR, a folder holding the files the reference reads (torchvision's
cifar-10-batches-py/ or cifar-100-python/, SVHN's train_32x32.mat and test_32x32.mat) or TFDS ArrayRecord files;
--config.data.format (default auto) names the format when DIR holds several.

Defaults are the reference's (configs.yml and scripts/get_compact_net_adv_train.sh): SGD lr 0.1 momentum 0.9
weight decay 1e-4, cosine schedule, batch 128, eps 0.031 (~8/255), PGD-10 step 0.0078 (~2/255), TRADES beta
6; 100 pretrain epochs at lr 0.1, 20 prune epochs at lr 0.1, 100 finetune epochs at lr 0.01; l_2: eps 0.5
(assumed: the reference has no l_2 defaults), step eps/4.
"""

from hydra_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_config_arg(
    arg, model="vgg16_bn", dataset="cifar10", objective="trades", norm="linf", semisup=""
  )
  config = config_lib.default_config()
  config.model.name = args.model
  config.data.name = args.dataset
  config.data.semisup_path = args.semisup
  config.objective.name = args.objective
  eps, step = (0.031, 0.0078) if args.norm == "linf" else (0.5, 0.125)
  for section in (config.objective, config.eval):
    section.eps, section.step_size, section.norm = eps, step, args.norm
  config.eval.methods = (f"pgd_{args.norm}",)
  config.stages.pretrain.epochs, config.stages.pretrain.lr = 100, 0.1
  config.stages.prune.epochs, config.stages.prune.lr = 20, 0.1
  config.stages.finetune.epochs, config.stages.finetune.lr = 100, 0.01
  config.ks = (0.1, 0.05, 0.01)
  return config
