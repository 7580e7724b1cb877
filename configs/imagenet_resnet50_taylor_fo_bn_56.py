"""ResNet-50 Taylor-FO-BN-56% on ImageNet from torchvision weights (reference
configs/imagenet_resnet50_prune56.json: 55 pruning steps of 100 units = 5500 of the 11,392 gates,
51.7% kept), then 25 epochs of fine-tuning; settings in configs/_imagenet.py.

  python -m taylor_jax.main --config=configs/imagenet_resnet50_taylor_fo_bn_56.py \
      --workdir=runs/imagenet_resnet50_56 --config.data_dir=TFDS_DIR \
      --config.train.init_torchvision=resnet50-19c8e357.pth
  python experiments/imagenet_table.py runs/imagenet_resnet50_*   # Table-3 rows

Expected: paper (Table 3, via a secondary source, row likely this one): top-1 76.18% -> 71.69%,
3.05x speed-up. The reference's 5,500 units leave 51.7% of the gates, not 56%.
"""

from configs import _imagenet


def get_config():
  return _imagenet.reference_config('resnet50', 56)
