"""Baseline only: pre-activation ResNet-18 on CIFAR-10 (the paper's correlation study, Table 1).

  python -m taylor_jax.main --config=configs/cifar10_preact_resnet18_baseline.py \
      --workdir=runs/cifar10_preact_resnet18 --config.data_dir=DIR

Needs CIFAR-10 prepared as array_record in DIR (see the README).
"""

from taylor_jax import configlib


def get_config():
  c = configlib.base_config()
  c.model = 'preact_resnet18'
  c.dataset = 'cifar10'
  c.train.epochs = 30.0
  c.optim.learning_rate = 0.1
  c.optim.weight_decay = 5e-4
  return c
