"""Shared settings of the ImageNet Taylor-FO-BN configs (paper Table 3): the reference's
hyper-parameters (NVlabs/Taylor_pruning README and configs/imagenet_*.json, see
shared/REFERENCE.md), starting from torchvision's pretrained weights.

Reference command: ``--lr=0.001 --lr-decay-every=10 --momentum=0.9 --epochs=25 --batch-size=256
--wd=0.0 --pruning-method=22`` with ``frequency=30``, ``prune_per_iteration=100``,
``pruning_momentum=0.9`` and no per-layer normalisation. Differences here, by design:

* pruning and fine-tuning are separate phases: pruning at the constant lr 0.001, then a fresh
  optimizer for 25 epochs of fine-tuning, lr 0.001 x0.1 after fine-tuning epochs 10 and 20 (the
  reference decays at run epochs 10 and 20; its pruning ends within the first epoch);
* the pruned network is physically smaller after every pruning step (the reference only masks);
* the reference's tiny group-lasso term (``--group_wd_coeff=1e-8``) is not used.
"""

from taylor_jax import configlib

REFERENCE_UNITS = {  # (pruning steps, units removed) of the reference's released configs
    ('resnet50', 91): (10, 1000), ('resnet50', 81): (22, 2200), ('resnet50', 72): (32, 3200),
    ('resnet50', 56): (55, 5500), ('resnet101', 75): (50, 5000), ('resnet101', 55): (90, 9000),
    ('resnet101', 50): (100, 10000), ('resnet101', 40): (120, 12000),
}


# torchvision's file names of the pretrained weights (ResNet-50/101: the ones the reference used).
# The configs default to these names in the working directory, so a run without the file stops
# at validation with a message naming it; --config.train.init_torchvision=PATH points elsewhere.
TORCHVISION_FILES = {
    'resnet18': 'resnet18-f37072fd.pth', 'resnet34': 'resnet34-b627a593.pth',
    'resnet50': 'resnet50-19c8e357.pth', 'resnet101': 'resnet101-5d3b4d8f.pth',
    'vgg11_bn': 'vgg11_bn-6002323d.pth', 'densenet121': 'densenet121-a639ec97.pth',
}


def taylor_config(model: str):
  """ImageNet fine-tuning + Taylor-FO-BN pruning of ``model`` from torchvision weights; the
  caller sets the target."""
  c = configlib.base_config()
  c.model = model
  c.dataset = 'imagenet2012'
  c.train.init_torchvision = TORCHVISION_FILES[model]
  c.train.epochs = 0.0  # no baseline training: the pretrained network is the baseline
  c.train.batch_size = 256
  c.train.eval_batch_size = 250
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 1000
  c.optim.name = 'sgd'
  c.optim.momentum = 0.9
  c.optim.nesterov = False  # torch.optim.SGD's default
  c.optim.weight_decay = 0.0
  c.optim.learning_rate = 0.001
  c.optim.decay_epochs = (10, 20)
  c.optim.decay_factor = 0.1

  c.prune.enabled = True
  c.prune.estimator = 'taylor_fo_bn'  # reference method 22
  c.prune.frequency = 30
  c.prune.prune_per_iteration = 100
  c.prune.ema_momentum = 0.9
  c.prune.normalize = 'none'
  c.prune.learning_rate = 0.001
  c.prune.eval_examples = 1000  # validation images after each pruning step (progress only)
  c.prune.finetune_epochs = 25.0
  c.prune.finetune_learning_rate = 0.001
  c.prune.finetune_schedule = 'step'
  return c


def reference_config(model: str, keep_percent: int):
  """A released reference config: exactly its pruning steps and units removed."""
  steps, units = REFERENCE_UNITS[(model, keep_percent)]
  c = taylor_config(model)
  c.prune.target_units = units
  c.prune.max_pruning_iterations = steps
  return c


def keep_share_config(model: str, keep_share):
  """A network the reference released no config for: prune until ``keep_share`` of the
  prunable units (gates) is left. ``keep_share`` may be the config-file argument (a string)."""
  c = taylor_config(model)
  c.prune.target_keep_share = float(keep_share)
  return c
