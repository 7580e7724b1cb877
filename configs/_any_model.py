"""Settings shared by the non-zoo example models (taylor_jax/models/examples/, plain Flax code
with no taylor_jax import): Fashion-MNIST, Taylor-FO-BN pruning to 40% fewer FLOPs, fine-tuning.
The channel groups come from discovery (taylor_jax/discovery.py); experiments/any_model_runs.py
runs every config below and writes experiments/results/any_model.{json,md}."""

from taylor_jax import configlib


def get_config(model: str, epochs: float, finetune_epochs: float):
  c = configlib.base_config()
  c.model = model  # 'package.module:Factory'
  c.dataset = 'fashion_mnist'
  c.train.epochs = epochs
  c.train.crop_pad = 0  # flip only: short budgets (configs/default.py)
  c.optim.learning_rate = 0.05
  c.prune.enabled = True
  c.prune.estimator = 'taylor_fo_bn'
  c.prune.frequency = 30
  c.prune.prune_per_iteration = 8
  c.prune.target_flops_reduction = 0.4
  c.prune.align = 4
  c.prune.learning_rate = 0.01
  c.prune.finetune_epochs = finetune_epochs
  c.prune.finetune_learning_rate = 0.02
  c.report.latency_repeats = 10
  c.report.latency_rounds = 3
  return c


def vit_config(model: str, epochs: float, finetune_epochs: float):
  """The ViT-Tiny runs rank units by score per FLOP saved (``prune.rank_by='score_per_flop'``)
  and prune at most half of any group (``prune.max_share=0.5``, Torch-Pruning's
  ``max_pruning_ratio``). A head is 16 channels of q, k, v and the output projection, an MLP
  neuron one hidden unit. Ranked by score alone (the paper's rule) the 40% cut came from the
  MLPs only (128 -> 24/4/4/8 neurons); by score per FLOP from the MLPs (60/20/16/24) and the
  value head dims (16/12/12/8); in neither run was a head ever the lowest unit, and an MLP of 4
  neurons is a degenerate block. With every group capped at half its width the MLPs and value
  dims give about 34% of the FLOPs at most (hand count from the shapes), so the rest of the cut
  has to come from heads (experiments/README.md)."""
  c = get_config(model, epochs=epochs, finetune_epochs=finetune_epochs)
  c.prune.rank_by = 'score_per_flop'
  c.prune.max_share = 0.5
  return c
