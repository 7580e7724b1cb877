"""Structured SNIP (Lee et al., ICLR 2019): prune ResNet-20 at initialisation by connection
sensitivity (one minibatch), then train the smaller network. Fashion-MNIST, >= 40% fewer FLOPs.

  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_snip.py \\
      --workdir=runs/fmnist_r20_snip40

60% fewer FLOPs:
  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_snip.py \\
      --workdir=runs/fmnist_r20_snip60 --config.prune.target_flops_reduction=0.6

Phases: no baseline training (train.epochs=0; the report's 'baseline' column is the untrained
initialisation) -> SNIP scores per unit, sum of |w dL/dw| over the group's slices normalised by
the total (taylor_jax/methods/snip.py), global ranking under the alignment, surgery -> 18 epochs
of training of the small network (prune.finetune_*: SGD + Nesterov, cosine from 0.1), the budget
of the trained-baseline methods (15 baseline + 3 fine-tuning epochs). Gate form instead:
--config.prune.snip.criterion=gate. What it should give: >= 40% fewer FLOPs, a network trained
from scratch at that size; measured accuracy against the other methods in
experiments/results/methods_comparison.md.
"""

from taylor_jax import configlib


def get_config():
  c = configlib.base_config()
  c.model = 'resnet20'
  c.dataset = 'fashion_mnist'
  c.train.epochs = 0.0  # SNIP scores the initialisation

  c.prune.enabled = True
  c.prune.method = 'snip'
  c.prune.target_flops_reduction = 0.4
  c.prune.prune_per_iteration = 8
  c.prune.align = 8  # CPU convolutions run odd channel counts slowly (experiments/README.md)
  c.prune.snip.criterion = 'weights'
  c.prune.snip.num_batches = 1
  c.prune.finetune_epochs = 18.0  # the training of the pruned network
  c.prune.finetune_learning_rate = 0.1
  return c
