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
  """The ViT-Tiny runs rank units by score per FLOP saved (``prune.rank_by='score_per_flop'``).
  A head is 16 channels of q, k and v and the output projection, an MLP neuron one hidden unit:
  ranked by score alone (the paper's rule) no head was ever the lowest, and the 40% cut came
  from the MLPs only (128 -> 24/4/4/8 neurons, 4/4/4/4 heads; experiments/README.md)."""
  c = get_config(model, epochs=epochs, finetune_epochs=finetune_epochs)
  c.prune.rank_by = 'score_per_flop'
  return c
