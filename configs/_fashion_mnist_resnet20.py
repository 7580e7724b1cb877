"""Settings shared by the method-comparison configs: ResNet-20 on Fashion-MNIST, a 15-epoch
baseline, a 40% FLOPs target and 3 epochs of fine-tuning (see experiments/compare_methods.py)."""

from taylor_jax import configlib


def get_config(method: str):
  c = configlib.base_config()
  c.model = 'resnet20'
  c.dataset = 'fashion_mnist'
  c.train.epochs = 15.0
  c.prune.enabled = True
  c.prune.method = method
  c.prune.target_flops_reduction = 0.4
  c.prune.finetune_epochs = 3.0
  c.prune.finetune_learning_rate = 0.02
  return c


def taylor_config(estimator: str):
  """The iterative engine with ``estimator``: 8 units every 30 minibatches, widths aligned to 8."""
  c = get_config('taylor')
  c.prune.estimator = estimator
  c.prune.frequency = 30
  c.prune.prune_per_iteration = 8
  c.prune.align = 8  # CPU convolutions run odd channel counts slowly (experiments/README.md)
  c.prune.learning_rate = 0.01
  return c
