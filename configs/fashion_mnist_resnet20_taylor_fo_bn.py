"""Taylor-FO-BN (the paper's criterion), iterative: ResNet-20 on Fashion-MNIST, >= 40% fewer
FLOPs, then fine-tuning; the reference point of the CVPR'19 method comparison
(experiments/compare_methods.py).

  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_taylor_fo_bn.py \\
      --workdir=runs/fmnist_r20_tfo40

60% fewer FLOPs:
  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_taylor_fo_bn.py \\
      --workdir=runs/fmnist_r20_tfo60 --config.prune.target_flops_reduction=0.6

Skip the baseline training with a trained ResNet-20 (configs/fashion_mnist_baseline.py, same 15
epochs): --config.train.init_checkpoint=runs/fmnist_r20

Phases: baseline (15 epochs) -> pruning (8 units, aligned to 8, every 30 minibatches at lr 0.01,
(dL/dz)^2 at the BN gates) -> fine-tuning (3 epochs, cosine from 0.02). What it should give: a
network with >= 40% fewer FLOPs (the last aligned step may overshoot by a few points) within
about a point of the baseline's test accuracy; the measured numbers of the comparison are in
experiments/results/methods_comparison.md.
"""

from taylor_jax import configlib


def get_config():
  c = configlib.base_config()
  c.model = 'resnet20'
  c.dataset = 'fashion_mnist'
  c.train.epochs = 15.0

  c.prune.enabled = True
  c.prune.method = 'taylor'
  c.prune.estimator = 'taylor_fo_bn'
  c.prune.target_flops_reduction = 0.4
  c.prune.frequency = 30
  c.prune.prune_per_iteration = 8
  c.prune.align = 8  # CPU convolutions run odd channel counts slowly (experiments/README.md)
  c.prune.learning_rate = 0.01
  c.prune.finetune_epochs = 3.0
  c.prune.finetune_learning_rate = 0.02
  return c
