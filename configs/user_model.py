"""Your own Flax model (Linen or NNX, unchanged) on Fashion-MNIST: baseline, Taylor-FO-BN pruning to
40% fewer FLOPs with the channel groups discovered from its jaxpr, fine-tuning, report.

  python -m taylor_jax.main --config=configs/user_model.py --workdir=runs/mine \
      --config.model=my_package.my_module:MyNet

``MyNet(num_classes=...)`` returns a Linen module (called as ``apply(v, x, train=...)`` when its
``__call__`` has a ``train`` argument) or, with a ``rngs`` argument, an NNX module
(``MyNet(num_classes=..., rngs=...)``, switched with ``.train()`` / ``.eval()``).
"""

from configs import _any_model


def get_config():
  return _any_model.get_config(
      'taylor_jax.models.examples.concat_cnn:ConcatCNN', epochs=3, finetune_epochs=1)
