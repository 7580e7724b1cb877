"""ResNet-50 Taylor-FO-BN-91% on ImageNet from torchvision weights (reference
configs/imagenet_resnet50_prune91.json: 10 pruning steps of 100 units = 1000 of the 11,392 gates,
91.2% kept), then 25 epochs of fine-tuning; settings in configs/_imagenet.py.

  python -m taylor_jax.main --config=configs/imagenet_resnet50_taylor_fo_bn_91.py \
      --workdir=runs/imagenet_resnet50_91 --config.data_dir=TFDS_DIR \
      --config.train.init_torchvision=resnet50-19c8e357.pth
  python experiments/imagenet_table.py runs/imagenet_resnet50_*   # Table-3 rows

Expected: paper Table 3 row Taylor-FO-BN-91%; its figures are not in shared/REFERENCE.md
(unverified).
"""

from configs import _imagenet


def get_config():
  return _imagenet.reference_config('resnet50', 91)
