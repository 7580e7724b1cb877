"""Variational pruning end to end in small (ResNet-8, 256 Fashion-MNIST images): with a FLOPs
target, and with the paper's own rule (rule=threshold: near-zero posteriors go, the target is ignored)."""

import numpy as np

from taylor_jax import models, run
from test_methods_e2e import check_report, config_from


def test_variational_with_a_flops_target(tmp_path, fashion_mnist_data_dir):
  c = config_from('configs/fashion_mnist_resnet20_variational.py', fashion_mnist_data_dir,
                  **{'prune.variational.epochs': 1.0})
  result = run.run(c, str(tmp_path))
  check_report(result, 0.3, str(tmp_path), fashion_mnist_data_dir)
  assert result['method']['name'] == 'variational'
  # The variational network trained from step 0 for one epoch (4 steps), then fine-tuning.
  assert result['history'][0]['step'] == 4
  assert result['pruned']['step'] == 6
  assert set(result['method']['mu']) == set(models.full_widths('resnet8'))


def test_variational_threshold_rule(tmp_path, fashion_mnist_data_dir):
  # A huge threshold: every unit is "near zero", so every group goes down to its minimum
  # (min_width 8 under align 8), and nothing needs fine-tuning.
  c = config_from('configs/fashion_mnist_resnet20_variational.py', fashion_mnist_data_dir,
                  **{'prune.variational.epochs': 0.5, 'prune.variational.rule': 'threshold',
                     'prune.variational.mean_threshold': 1e9,
                     'prune.variational.var_threshold': 1e9, 'prune.finetune_epochs': 0.0})
  result = run.run(c, str(tmp_path))
  assert result['pruned']['widths'] == {k: 8 for k in models.full_widths('resnet8')}
  assert result['pruned']['step'] == 2
  assert all(np.asarray(list(result['method']['near_zero_units'].values())) > 0)
