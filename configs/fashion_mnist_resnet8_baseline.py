"""Baseline only: ResNet-8 on Fashion-MNIST, the default job's first phase on its own.

  python -m taylor_jax.main --config=configs/fashion_mnist_resnet8_baseline.py \
      --workdir=runs/fmnist_resnet8_baseline

Its workdir seeds pruning runs that skip baseline training (experiments/bench_surgery.py):
  --config=configs/default.py --config.train.init_checkpoint=runs/fmnist_resnet8_baseline
"""

from configs import default


def get_config():
  c = default.get_config()
  c.prune.enabled = False
  return c
