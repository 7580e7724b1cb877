"""Cascaded Projection (Minnehan & Savakis, CVPR 2019): ResNet-20 on Fashion-MNIST, >= 40% fewer
FLOPs by learnt orthonormal projections inside the residual blocks, then fine-tuning.

  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_cascaded_projection.py \\
      --workdir=runs/fmnist_r20_cap40

60% fewer FLOPs:
  python -m taylor_jax.main --config=configs/fashion_mnist_resnet20_cascaded_projection.py \\
      --workdir=runs/fmnist_r20_cap60 --config.prune.target_flops_reduction=0.6

Skip the baseline training with a trained ResNet-20 (configs/fashion_mnist_baseline.py):
  --config.train.init_checkpoint=runs/fmnist_r20

Phases: baseline (train.epochs) -> projections (prune.cascaded_projection.steps SGD steps on the
projections, taylor_jax/methods/cascaded_projection.py) -> surgery -> fine-tuning
(prune.finetune_epochs). Options: --config.prune.cascaded_projection.{placement,init,rank_rule,
steps,learning_rate,recon_weight,train_weights,...}.
"""

from configs import _fashion_mnist_resnet20


def get_config():
  c = _fashion_mnist_resnet20.get_config('cascaded_projection')
  cap = c.prune.cascaded_projection
  cap.placement = 'pre'
  cap.init = 'select'
  cap.rank_rule = 'uniform'
  cap.steps = 400
  cap.learning_rate = 0.01
  cap.recon_weight = 1.0
  return c
