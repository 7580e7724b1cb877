"""MobileNetV2Linen (taylor_jax/models/examples/mobilenet_v2.py, plain Flax) on Fashion-MNIST: 3-epoch baseline,
Taylor-FO-BN to 40% fewer FLOPs with discovered groups, 1 epoch(s) of fine-tuning.

  python -m taylor_jax.main --config=configs/fashion_mnist_mobilenet_v2_linen.py --workdir=runs/mobilenet_v2_linen

Result (seed 0, this CPU): 89.21% baseline -> 88.44% at -40.5% FLOPs
(experiments/results/any_model.md; experiments/any_model_runs.py runs it).
"""

from configs import _any_model


def get_config():
  return _any_model.get_config(
      'taylor_jax.models.examples.mobilenet_v2:MobileNetV2Linen', epochs=3, finetune_epochs=1)
