"""ConcatCNN (taylor_jax/models/examples/concat_cnn.py, plain Flax) on Fashion-MNIST: 4-epoch baseline,
Taylor-FO-BN to 40% fewer FLOPs with discovered groups, 1 epoch(s) of fine-tuning.

  python -m taylor_jax.main --config=configs/fashion_mnist_concat_cnn.py --workdir=runs/concat_cnn

Result (seed 0, this CPU): 90.36% baseline -> 90.59% at -42.5% FLOPs
(experiments/results/any_model.md; experiments/any_model_runs.py runs it).
"""

from configs import _any_model


def get_config():
  return _any_model.get_config(
      'taylor_jax.models.examples.concat_cnn:ConcatCNN', epochs=4, finetune_epochs=1)
