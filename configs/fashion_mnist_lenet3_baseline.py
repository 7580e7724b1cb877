"""Baseline only: LeNet3 (the reference code's small net, no BatchNorm) on Fashion-MNIST.

  python -m taylor_jax.main --config=configs/fashion_mnist_lenet3_baseline.py \
      --workdir=runs/fmnist_lenet3

experiments/oracle_correlation.py and experiments/pruning_curves.py train it per seed with a
smaller budget (--epochs).
"""

from taylor_jax import configlib


def get_config():
  c = configlib.base_config()
  c.model = 'lenet3'
  c.dataset = 'fashion_mnist'
  c.train.epochs = 10.0
  # Flip only, as the default job: random crops cost more than they win in a short budget.
  c.train.crop_pad = 0
  # No BatchNorm: a smaller peak learning rate than the ResNets' 0.1 keeps the first steps stable.
  c.optim.learning_rate = 0.05
  c.optim.weight_decay = 5e-4
  return c
