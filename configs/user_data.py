"""Your own numpy arrays (a .npz file, a directory of .npy files, or 'package.module:function'):
configs/default.py (ResNet-8, Taylor-FO-BN pruning to 40% fewer FLOPs) on them. E.g. sklearn's
digits (1797 8x8 grayscale images, float 0..16):

  python -c "import numpy as np; from sklearn.datasets import load_digits; d = load_digits(); \
np.savez('digits.npz', x_train=d.images[:1500], y_train=d.target[:1500], \
x_test=d.images[1500:], y_test=d.target[1500:])"
  python -m taylor_jax.main --config=configs/user_data.py --workdir=runs/digits \
      --config.dataset=digits.npz

The number of classes and the image shape come from the arrays; the per-channel mean/std from the
training images (or --config.data_mean='(0.5,)' --config.data_std='(0.25,)') and are saved with
the checkpoints, so ``--mode=evaluate`` normalises the test images the same way. No random flips or
crops (train.augment): they would change digits; turn them on for data where a mirror image keeps
its class. Give config.dataset as an absolute path when evaluating from another directory.
"""

from configs import default


def get_config():
  c = default.get_config()  # ResNet-8, Taylor-FO-BN to 40% fewer FLOPs, widths aligned to 8
  c.dataset = '<your data: set --config.dataset>'  # refused, with the ways to bring data
  c.train.epochs = 20.0
  c.train.batch_size = 64
  c.train.augment = False
  c.train.checkpoint_every_steps = 200
  c.optim.learning_rate = 0.05
  c.prune.frequency = 10
  c.prune.eval_examples = 500
  c.prune.finetune_epochs = 5.0
  return c
