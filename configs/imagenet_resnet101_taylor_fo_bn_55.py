"""ResNet-101 Taylor-FO-BN-55% on ImageNet from torchvision weights (reference
configs/imagenet_resnet101_prune55.json: 90 pruning steps of 100 units = 9000 of the 20,096
gates, 55.2% kept), then 25 epochs of fine-tuning; settings in configs/_imagenet.py.

  python -m taylor_jax.main --config=configs/imagenet_resnet101_taylor_fo_bn_55.py \
      --workdir=runs/imagenet_resnet101_55 --config.data_dir=TFDS_DIR \
      --config.train.init_torchvision=resnet101-5d3b4d8f.pth
  python experiments/imagenet_table.py runs/imagenet_resnet101_*   # Table-3 rows

Expected: paper Table 3 row Taylor-FO-BN-55%. The abstract's ResNet-101 result is -0.02 points
top-1 at -40% FLOPs and -30% parameters; which row that is, and the rows' figures, are not in
shared/REFERENCE.md (unverified).
"""

from configs import _imagenet


def get_config():
  return _imagenet.reference_config('resnet101', 55)
