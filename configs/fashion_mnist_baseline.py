"""Baseline only (no pruning): ResNet-20 on Fashion-MNIST.

  python -m taylor_jax.main --config=configs/fashion_mnist_baseline.py --workdir=runs/fmnist_r20

Its workdir can seed a pruning run: --config.train.init_checkpoint=runs/fmnist_r20.
"""

from taylor_jax import configlib


def get_config():
  c = configlib.base_config()
  c.model = 'resnet20'
  c.dataset = 'fashion_mnist'
  c.train.epochs = 15.0
  return c
