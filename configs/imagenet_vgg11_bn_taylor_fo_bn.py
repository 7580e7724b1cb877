"""VGG11-BN Taylor-FO-BN on ImageNet from torchvision weights: prune until a share of the
10,944 prunable units (gates) is left (default 0.72; the config argument after ':' sets it),
then 25 epochs of fine-tuning. The reference released no config for this network (its README
lists VGG and DenseNet configs as 'to come'); its ResNet settings are used (configs/_imagenet.py).

  python -m taylor_jax.main --config=configs/imagenet_vgg11_bn_taylor_fo_bn.py:0.72 \
      --workdir=runs/imagenet_vgg11_bn_72 --config.data_dir=TFDS_DIR \
      --config.train.init_torchvision=vgg11_bn-6002323d.pth
  python experiments/imagenet_table.py runs/imagenet_vgg11_bn_*   # Table-3 rows

Expected: not in shared/REFERENCE.md (unverified).
"""

from configs import _imagenet


def get_config(keep_share='0.72'):
  return _imagenet.keep_share_config('vgg11_bn', keep_share)
