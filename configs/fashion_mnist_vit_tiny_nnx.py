"""ViTTinyNNX (taylor_jax/models/examples/vit_tiny.py, plain Flax) on Fashion-MNIST: 4-epoch baseline,
Taylor-FO-BN to 40% fewer FLOPs with discovered groups, ranked by score per FLOP saved (heads
and MLP neurons cost very different FLOPs; configs/_any_model.py), 1 epoch of fine-tuning.

  python -m taylor_jax.main --config=configs/fashion_mnist_vit_tiny_nnx.py --workdir=runs/vit_tiny_nnx

Result: experiments/results/any_model.md (experiments/any_model_runs.py runs it).
"""

from configs import _any_model


def get_config():
  return _any_model.vit_config(
      'taylor_jax.models.examples.vit_tiny:ViTTinyNNX', epochs=4, finetune_epochs=1)
