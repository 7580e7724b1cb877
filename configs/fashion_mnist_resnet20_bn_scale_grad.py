"""BN-scale gradient |gamma dL/dgamma| (the seed notes' idea) as the criterion of the iterative
Taylor engine: ResNet-20 on Fashion-MNIST, >= 40% fewer FLOPs, then fine-tuning.

  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_bn_scale_grad.py \\
      --workdir=runs/fmnist_r20_bsg40

60% fewer FLOPs:
  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_bn_scale_grad.py \\
      --workdir=runs/fmnist_r20_bsg60 --config.prune.target_flops_reduction=0.6

Skip the baseline training with a trained ResNet-20 (configs/fashion_mnist_baseline.py, same 15
epochs): --config.train.init_checkpoint=runs/fmnist_r20

Same schedule as configs/fashion_mnist_resnet20_taylor_fo_bn.py, only the estimator differs
(estimators.bn_scale_grad: per unit |sum over the group's BatchNorms of gamma dL/dgamma|).
What it should give: >= 40% fewer FLOPs at an accuracy close to Taylor-FO-BN's (for a gate right
after one BN, gamma g_gamma is one of the two terms of dL/dz = gamma g_gamma + beta g_beta); the
measured numbers are in experiments/results/methods_comparison.md.
"""

from configs import _fashion_mnist_resnet20


def get_config():
  return _fashion_mnist_resnet20.taylor_config('bn_scale_grad')
