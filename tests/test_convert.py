"""taylor_jax.convert: torchvision state dicts -> our variables, checked against PyTorch.

Each model is a hand-written PyTorch twin with torchvision's exact state-dict keys
(tests/torch_reference_models.py) with random weights and random BatchNorm running statistics,
in eval mode; our converted model must give the same logits (max abs difference <= 1e-4) on
64x64 inputs. At 64x64 VGG's last feature map is 2x2, so the adaptive 7x7 pooling replicates it
and the NCHW -> NHWC permutation of ``classifier.0`` is exercised for real (a converter without
it is shown to fail). The error messages for bad state dicts are checked too.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from taylor_jax import configlib, convert, models  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference_models as R  # noqa: E402

TOL = 1e-4


def _torch_model(name: str, seed: int = 0):
  torch.set_num_threads(2)
  return R.randomize(R.BUILDERS[name](), seed)


def _input(seed: int = 1) -> np.ndarray:
  """(2, 3, 64, 64) NCHW float32."""
  return np.random.default_rng(seed).normal(size=(2, 3, 64, 64)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _apply(name: str):
  """The jitted forward, one per model: a new model's bound ``apply`` would compile again."""
  return jax.jit(models.create(name, 1000).apply)


def _logits(name: str, variables, x_nchw: np.ndarray) -> np.ndarray:
  return np.asarray(_apply(name)(variables, x_nchw.transpose(0, 2, 3, 1)))


# The tests that use the session-scoped ``resnet18_sd`` run on one pytest-xdist worker (run_tests.sh:
# --dist loadgroup), so that it is built once, not once per worker (session scope:
# not torn down and rebuilt when the worker runs another module's test in between).
SHARED = pytest.mark.xdist_group('convert_resnet18_sd')


@pytest.fixture(scope='session')
def resnet18_sd():
  return {k: v.numpy() for k, v in _torch_model('resnet18').state_dict().items()}


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'vgg11_bn', 'densenet121'])
def test_converted_logits_match_torch(name):
  tm = _torch_model(name)
  x = _input()
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  # Non-trivial logits, so that the tolerance means something.
  assert want.std() > 0.1
  v = convert.convert(name, tm.state_dict())
  got = _logits(name, v, x)
  assert got.shape == want.shape == (2, 1000)
  assert np.abs(got - want).max() <= TOL
  if name == 'vgg11_bn':
    # Without the (C,7,7) -> (7,7,C) permutation of classifier.0 the logits are far off.
    v['params']['classifier_0']['kernel'] = tm.classifier[0].weight.detach().numpy().T
    assert np.abs(_logits(name, v, x) - want).max() > 100 * TOL


@SHARED
def test_layouts_and_bn_statistics(resnet18_sd):
  v = convert.convert('resnet18', resnet18_sd)
  np.testing.assert_array_equal(v['params']['conv1']['kernel'],
                                resnet18_sd['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v['params']['fc']['kernel'], resnet18_sd['fc.weight'].T)
  np.testing.assert_array_equal(v['params']['layer2_0']['downsample_bn']['scale'],
                                resnet18_sd['layer2.0.downsample.1.weight'])
  np.testing.assert_array_equal(v['batch_stats']['layer4_1']['bn2']['var'],
                                resnet18_sd['layer4.1.bn2.running_var'])
  assert set(v) == {'params', 'batch_stats'}


@SHARED
def test_pth_and_npz_files_and_prefixes(tmp_path, resnet18_sd):
  want = convert.convert('resnet18', resnet18_sd)
  pth = str(tmp_path / 'r18.pth')
  # A DataParallel checkpoint wrapped in {'state_dict': ...}, as training scripts save it.
  torch.save({'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in resnet18_sd.items()},
              'epoch': 3}, pth)
  npz = str(tmp_path / 'r18.npz')
  assert convert.main([pth, npz, '--model=resnet18']) == 0
  for source in (pth, npz):
    got = convert.convert('resnet18', source)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_old_densenet_keys_are_renamed():
  sd = convert.normalize_keys({'features.denseblock1.denselayer1.norm.1.weight': np.ones(2),
                               'features.denseblock1.denselayer1.conv.2.weight': np.ones(2),
                               'features.norm5.weight': np.ones(2)})
  assert set(sd) == {'features.denseblock1.denselayer1.norm1.weight',
                     'features.denseblock1.denselayer1.conv2.weight', 'features.norm5.weight'}


@SHARED
def test_missing_key(resnet18_sd):
  sd = dict(resnet18_sd)
  del sd['layer3.1.bn1.running_mean']
  want = r"missing key 'layer3\.1\.bn1\.running_mean' \(expected shape \(256,\)\)"
  with pytest.raises(convert.ConversionError, match=want):
    convert.convert('resnet18', sd)


@SHARED
def test_unexpected_key(resnet18_sd):
  sd = dict(resnet18_sd, **{'head.weight': np.zeros((3, 3), np.float32)})
  want = r"unexpected key 'head\.weight' \(shape \(3, 3\)\)"
  with pytest.raises(convert.ConversionError, match=want):
    convert.convert('resnet18', sd)


@SHARED
def test_wrong_shape_names_key_shapes_and_classes(resnet18_sd):
  sd = dict(resnet18_sd, **{'fc.weight': np.zeros((10, 512), np.float32),
                            'fc.bias': np.zeros((10,), np.float32)})
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('resnet18', sd)
  msg = str(e.value)
  assert "key 'fc.weight': expected shape (1000, 512), got (10, 512)" in msg
  assert 'its classifier has 10 classes' in msg
  convert.convert('resnet18', sd, num_classes=10)  # fits once asked for 10 classes


@SHARED
def test_reduced_widths_are_named(resnet18_sd):
  """A state dict narrower in one group: the error names the group and both widths; with those
  widths given, it converts."""
  sd = dict(resnet18_sd)
  for k in ('layer1.0.conv1.weight', 'layer1.0.bn1.weight', 'layer1.0.bn1.bias',
            'layer1.0.bn1.running_mean', 'layer1.0.bn1.running_var'):
    sd[k] = sd[k][:40]
  sd['layer1.0.conv2.weight'] = sd['layer1.0.conv2.weight'][:, :40]
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('resnet18', sd)
  msg = str(e.value)
  assert "key 'layer1.0.conv1.weight': expected shape (64, 64, 3, 3), got (40, 64, 3, 3)" in msg
  assert 'reduced widths in 1 group(s) (layer1.0.bn1: 64 wanted, 40 found)' in msg
  widths = dict(models.full_widths('resnet18'), **{'layer1.0.bn1': 40})
  v = convert.convert('resnet18', sd, widths=widths)
  assert v['params']['layer1_0']['conv2']['kernel'].shape == (3, 3, 40, 64)


@SHARED
def test_full_width_weights_for_reduced_widths(resnet18_sd):
  widths = dict(models.full_widths('resnet18'), layer4=256)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert('resnet18', resnet18_sd, widths=widths)
  msg = str(e.value)
  assert 'its widths are the full (torchvision) widths' in msg
  assert 'torchvision weights are full-width models' in msg


@SHARED
def test_wrong_model_is_named(resnet18_sd):
  want = r"keys are those of zoo model\(s\) \['resnet18'\], not 'resnet34'"
  with pytest.raises(convert.ConversionError, match=want):
    convert.convert('resnet34', resnet18_sd)
  with pytest.raises(convert.ConversionError, match=r"no torchvision layout for model 'resnet20'"):
    convert.convert('resnet20', resnet18_sd)


def test_config_validation_of_init_torchvision(tmp_path):
  c = configlib.base_config()
  c.model = 'resnet18'
  c.dataset = 'imagenet2012'
  c.train.init_torchvision = str(tmp_path / 'nope.pth')
  with pytest.raises(ValueError, match=r"train\.init_torchvision='.*nope\.pth': no such file"):
    configlib.validate(c)
  c.model = 'resnet20'
  with pytest.raises(ValueError, match=r"model='resnet20' has no torchvision layout"):
    configlib.validate(c)
