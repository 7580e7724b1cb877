"""ViTTinyLinen (taylor_jax/models/examples/vit_tiny.py, plain Flax) on Fashion-MNIST: 4-epoch baseline,
Taylor-FO-BN to 40% fewer FLOPs with discovered groups, ranked by score per FLOP saved, at most
half of each group pruned (heads and MLP neurons cost very different FLOPs; configs/_any_model.py),
1 epoch of fine-tuning.

  python -m taylor_jax.main --config=configs/fashion_mnist_vit_tiny_linen.py --workdir=runs/vit_tiny_linen

Result (seed 0, this CPU): 85.48% baseline -> 85.77% at -40.6% FLOPs, heads 4/4/3/3, MLPs 64
(experiments/results/any_model.md; experiments/any_model_runs.py runs it).
"""

from configs import _any_model


def get_config():
  return _any_model.vit_config(
      'taylor_jax.models.examples.vit_tiny:ViTTinyLinen', epochs=4, finetune_epochs=1)
