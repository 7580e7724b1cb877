"""ResNet-34 Taylor-FO-BN on ImageNet from torchvision weights: prune until a share of the
4,736 prunable units (gates) is left (default 0.72; the config argument after ':' sets it),
then 25 epochs of fine-tuning. The reference released no config for this network (its README
lists VGG and DenseNet configs as 'to come'); its ResNet settings are used (configs/_imagenet.py).

  python -m taylor_jax.main --config=configs/imagenet_resnet34_taylor_fo_bn.py:0.72 \
      --workdir=runs/imagenet_resnet34_72 --config.data_dir=TFDS_DIR \
      --config.train.init_torchvision=resnet34-b627a593.pth
  python experiments/imagenet_table.py runs/imagenet_resnet34_*   # Table-3 rows

Expected: paper (via a secondary source): top-1 73.31% -> 72.83% at a 1.29x speed-up;
the row's keep share is not in shared/REFERENCE.md (unverified).
"""

from configs import _imagenet


def get_config(keep_share='0.72'):
  return _imagenet.keep_share_config('resnet34', keep_share)
