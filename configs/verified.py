"""Verifiably robust HYDRA: CROWN-IBP or MixTrain on SVHN / CIFAR-10 with CNN-small / CNN-large (reference
configs_crown-ibp.yml, configs_mixtrain.yml and get_compact_net_{crown-ibp,mixtrain}.sh).

Run one stage at a time, as the reference scripts do (the eps schedule length differs per stage):
  hydra-jax train --config configs/verified.py:method=crown_ibp,model=cnn_large,stage=pretrain \
      --workdir runs/svhn_crown_large/pretrain
  hydra-jax train --config configs/verified.py:method=crown_ibp,model=cnn_large,stage=prune --config.k=0.01 \
      --config.source=runs/svhn_crown_large/pretrain --workdir runs/svhn_crown_large/k0.01/prune
  hydra-jax train --config configs/verified.py:method=crown_ibp,model=cnn_large,stage=finetune --config.k=0.01 \
      --config.source=runs/svhn_crown_large/k0.01/prune --workdir runs/svhn_crown_large/k0.01/finetune
LWM (the reference's "weight based pruning": finetune from the pretrained net with magnitude scores) is the
finetune stage with --config.source=<pretrain dir> --config.stages.finetune.score_init=scaled
--config.stages.finetune.lr=5e-4.

Arguments (comma separated NAME=VALUE):
  method   crown_ibp | mixtrain (objectives of the same names), default crown_ibp.
  dataset  svhn_cropped | cifar10, default svhn_cropped (the reference scripts' dataset).
  model    cnn_large | cnn_small (the reference's cifar_model_large / cifar_model), default cnn_large.
  stage    pretrain | prune | finetune, default pretrain.

Reference settings, l_inf eps 0.007 on [0, 1] pixels (starting eps 0), Adam lr 1e-3 with the cosine schedule
and weight decay 1e-4 added to the gradient before Adam, as the reference's torch Adam does:
  crown_ibp: batch 128; pretrain 200 epochs, eps ramped over 120 (beta 1 -> 0 with it); prune 20 epochs at
    lr 1e-5 and finetune 100 epochs at lr 1e-5, both with schedule length 1 (final eps, pure IBP); LWM lr 5e-4.
  mixtrain: batch 50, mixtraink 1 (cnn_large) or 5 (cnn_small), alpha 0.8, interval weight 0.1; pretrain 60
    epochs with eps ramped over 15; prune 20 epochs at lr 1e-5 and finetune 60 epochs at lr 5e-4 with
    schedule length 0; LWM lr 5e-4.
The reference evaluates with IBP (crown_ibp) or symbolic intervals (mixtrain) at the final eps; k in
{0.1, 0.05, 0.01}. The reference clips the eps-box to the batch's min / max; here to [0, 1].
"""

from hydra_jax import config as config_lib

_STAGES = {  # method -> stage -> (epochs, lr, schedule_length)
  "crown_ibp": {"pretrain": (200, 1e-3, 120), "prune": (20, 1e-5, 1), "finetune": (100, 1e-5, 1)},
  "mixtrain": {"pretrain": (60, 1e-3, 15), "prune": (20, 1e-5, 0), "finetune": (60, 5e-4, 0)},
}
_BATCH = {"crown_ibp": 128, "mixtrain": 50}


def get_config(arg=None):
  args = config_lib.parse_config_arg(
    arg,
    choices={"method": tuple(_STAGES), "stage": tuple(_STAGES["crown_ibp"])},
    method="crown_ibp",
    dataset="svhn_cropped",
    model="cnn_large",
    stage="pretrain",
  )
  config = config_lib.default_config()
  config.stage = args.stage
  config.model.name = args.model
  config.data.name = args.dataset
  config.data.batch_size = _BATCH[args.method]
  config.objective = config_lib.objective_config(args.method)
  config.objective.eps, config.objective.starting_epsilon = 0.007, 0.0
  epochs, lr, schedule_length = _STAGES[args.method][args.stage]
  config.objective.schedule_length = schedule_length
  if args.method == "mixtrain":
    config.objective.mixtraink = 1 if args.model == "cnn_large" else 5
  config.stages[args.stage].epochs, config.stages[args.stage].lr = epochs, lr
  config.optimizer.name, config.optimizer.schedule = "adam", "cosine"
  config.eval.eps = 0.007
  config.eval.methods = ("pgd_linf", "ibp" if args.method == "crown_ibp" else "symbolic")
  config.ks = (0.1, 0.05, 0.01)
  return config
