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

from configs import _fashion_mnist_resnet20


def get_config():
  return _fashion_mnist_resnet20.taylor_config('taylor_fo_bn')
