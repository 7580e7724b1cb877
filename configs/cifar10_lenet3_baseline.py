"""Baseline only: LeNet3 on CIFAR-10 (the paper's correlation study, Table 1).

  python -m taylor_jax.main --config=configs/cifar10_lenet3_baseline.py \
      --workdir=runs/cifar10_lenet3 --config.data_dir=DIR

Needs CIFAR-10 prepared as array_record in DIR (see the README).
"""

from configs import fashion_mnist_lenet3_baseline


def get_config():
  c = fashion_mnist_lenet3_baseline.get_config()
  c.dataset = 'cifar10'
  c.train.crop_pad = 4
  c.train.epochs = 30.0
  return c
