"""ResNet-50 Taylor-FO-BN-72% on ImageNet from torchvision weights (reference
configs/imagenet_resnet50_prune72.json: 32 pruning steps of 100 units = 3200 of the 11,392 gates,
71.9% kept), then 25 epochs of fine-tuning; settings in configs/_imagenet.py.

  python -m taylor_jax.main --config=configs/imagenet_resnet50_taylor_fo_bn_72.py \
      --workdir=runs/imagenet_resnet50_72 --config.data_dir=TFDS_DIR \
      --config.train.init_torchvision=resnet50-19c8e357.pth
  python experiments/imagenet_table.py runs/imagenet_resnet50_*   # Table-3 rows

Expected: paper (Table 3, via secondary sources in shared/REFERENCE.md): top-1 76.18% -> 74.50%
(error 23.82% -> 25.50%), 4.09 -> 2.25 GFLOPs.
"""

from configs import _imagenet


def get_config():
  return _imagenet.reference_config('resnet50', 72)
