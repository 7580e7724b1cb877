"""MobileNetV2NNX (taylor_jax/models/examples/mobilenet_v2.py, plain Flax) on Fashion-MNIST: 3-epoch baseline,
Taylor-FO-BN to 40% fewer FLOPs with discovered groups, 1 epoch(s) of fine-tuning.

  python -m taylor_jax.main --config=configs/fashion_mnist_mobilenet_v2_nnx.py --workdir=runs/mobilenet_v2_nnx

Result (seed 0, this CPU): 87.95% baseline -> 87.11% at -41.1% FLOPs
(experiments/results/any_model.md; experiments/any_model_runs.py runs it).
"""

from configs import _any_model


def get_config():
  return _any_model.get_config(
      'taylor_jax.models.examples.mobilenet_v2:MobileNetV2NNX', epochs=3, finetune_epochs=1)
