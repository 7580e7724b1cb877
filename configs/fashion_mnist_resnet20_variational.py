"""Variational CNN pruning (Zhao et al., CVPR 2019): ResNet-20 on Fashion-MNIST trained from
scratch with a Gaussian channel saliency on every BatchNorm (KL to a N(0, 0.1^2) prior), pruned
where the saliency sits near zero, the posterior mean folded into the kept channels.

  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_variational.py \\
      --workdir=runs/fmnist_r20_var40

60% fewer FLOPs:
  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_variational.py \\
      --workdir=runs/fmnist_r20_var60 --config.prune.target_flops_reduction=0.6

The paper's own stopping rule (the FLOPs target is ignored: every unit with |mu| < 0.05 and
sigma^2 < 0.04 goes, as far as the alignment allows):
  --config.prune.variational.rule=threshold

Phases: no baseline training (train.epochs=0) -> 17 epochs of variational training
(taylor_jax/methods/variational.py; SGD as optim, cosine from 0.1, kl_weight 1e-4 on the
minibatch-mean loss) -> the units with the smallest |mu| go until the target is met -> fold +
surgery -> 1 epoch of fine-tuning (the paper needs none: --config.prune.finetune_epochs=0; the
report's history entry has the accuracy without it). 18 epochs in all, the budget of the
trained-baseline methods. What it should give: >= 40% fewer FLOPs; the report's 'method' entry
holds mu, sigma per unit and the eval-subset accuracy of the variational network before
pruning; measured accuracy against the other methods in experiments/results/methods_comparison.md.
"""

from taylor_jax import configlib


def get_config():
  c = configlib.base_config()
  c.model = 'resnet20'
  c.dataset = 'fashion_mnist'
  c.train.epochs = 0.0  # the variational network trains from scratch inside the method

  c.prune.enabled = True
  c.prune.method = 'variational'
  c.prune.target_flops_reduction = 0.4
  c.prune.prune_per_iteration = 8
  c.prune.align = 8  # CPU convolutions run odd channel counts slowly (experiments/README.md)
  v = c.prune.variational
  v.epochs = 17.0
  v.kl_weight = 1e-4
  v.prior_sigma = 0.1
  v.init_sigma = 0.05
  v.rule = 'auto'  # 'target' here (a target is set); 'threshold': the paper's rule
  v.mean_threshold = 0.05
  v.var_threshold = 0.04
  c.prune.finetune_epochs = 1.0
  c.prune.finetune_learning_rate = 0.02
  return c
