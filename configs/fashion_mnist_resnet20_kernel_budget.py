"""Kernel-statistics layer redundancy (the seed notes' experiment): per-group pruning budgets from
the effective rank of each group's filters, Taylor-FO-BN picks the units inside each group, one
shot, then fine-tuning. ResNet-20 on Fashion-MNIST, >= 40% fewer FLOPs.

  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_kernel_budget.py \\
      --workdir=runs/fmnist_r20_kb40

60% fewer FLOPs:
  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_kernel_budget.py \\
      --workdir=runs/fmnist_r20_kb60 --config.prune.target_flops_reduction=0.6

Skip the baseline training with a trained ResNet-20 (configs/fashion_mnist_baseline.py, same 15
epochs): --config.train.init_checkpoint=runs/fmnist_r20

Phases: baseline (15 epochs) -> budgets (taylor_jax/methods/kernel_budget.py: redundancy
1 - erank/min(units, fan_in) per producer kernel; the global number of units grows by
prune.prune_per_iteration until the FLOPs target is met) -> Taylor-FO-BN scores over 16
minibatches pick the units inside each group -> surgery -> fine-tuning (3 epochs, cosine from
0.02). Other statistic: --config.prune.kernel_budget.statistic=cosine; within-group criterion:
--config.prune.kernel_budget.criterion=weight_l2. What it should give: >= 40% fewer FLOPs; the
report's 'method' entry lists each group's redundancy and budget; measured accuracy against the
other methods in experiments/results/methods_comparison.md.
"""

from configs import _fashion_mnist_resnet20


def get_config():
  c = _fashion_mnist_resnet20.get_config('kernel_budget')
  c.prune.prune_per_iteration = 8
  c.prune.align = 8  # CPU convolutions run odd channel counts slowly (experiments/README.md)
  kb = c.prune.kernel_budget
  kb.statistic = 'effective_rank'
  kb.criterion = 'taylor_fo_bn'
  kb.num_batches = 16
  return c
