"""The main job's ImageNet path end to end on TFDS mock data: torchvision-format weights
(train.init_torchvision) -> Taylor-FO-BN pruning with surgery -> fine-tuning -> report ->
experiments/imagenet_table.py.

The only mock is TFDS's ``tfds.testing.mock_data``: random ``imagenet2012`` examples (images of
random size 5-49 px, 1000 classes) behind the stock builder's ``as_data_source``. Our pipeline
opens the builder by name and refuses unprepared or non-array_record data, so the test writes the
stock builder's real metadata (features, array_record format, split sizes) into a data dir first;
the records themselves come from TFDS's fake-example generator. Everything else (the converter,
the input pipeline's crops/resizes, training, pruning, surgery, costs, report) runs for real, at
32x32 px on ResNet-18.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
tfds = pytest.importorskip('tensorflow_datasets')

from taylor_jax import models, run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import torch_reference_models as R  # noqa: E402

N_TRAIN, N_VAL = 48, 16


def _write_metadata(data_dir: str) -> None:
  """The stock imagenet2012 builder's metadata as if prepared to array_record (no records)."""
  b = tfds.builder('imagenet2012', data_dir=data_dir)
  b.info.set_file_format('array_record', override=True)

  def split(name, n):
    template = tfds.core.ShardedFileTemplate(
        data_dir=b.data_dir, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
        dataset_name='imagenet2012', split=name, filetype_suffix='array_record')
    return tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0,
                               filename_template=template)

  b.info.set_splits(tfds.core.SplitDict([split('train', N_TRAIN), split('validation', N_VAL)]))
  os.makedirs(b.data_dir, exist_ok=True)
  b.info.write_to_directory(b.data_dir)


class _FakeSource:
  """Random-access fake examples from TFDS's own generator (``RandomFakeGenerator``).

  Passed as mock_data's ``as_data_source_fn``: the default mocked source of TFDS 4.9.10 sets
  ``__getitems__`` as an unbound ``functools.partial`` on a MagicMock, so batched reads
  (``source.__getitems__(keys)``) fail with a TypeError.
  """

  def __init__(self, features, n: int, seed: int):
    from tensorflow_datasets.testing import mocking
    self._gen = mocking.RandomFakeGenerator(features, n, seed=seed)
    self._n = n

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._gen[int(i)]


def _as_data_source(builder, split, **kwargs):
  del kwargs
  n = N_TRAIN if split == 'train' else N_VAL
  return _FakeSource(builder.info.features, n, seed=0 if split == 'train' else 10_000)


def _config(data_dir: str, pth: str):
  spec = importlib.util.spec_from_file_location(
      'imagenet_resnet18', os.path.join(ROOT, 'configs', 'imagenet_resnet18_taylor_fo_bn.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('0.9')
  c.data_dir = data_dir
  c.image_size = 32
  c.train.init_torchvision = pth
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.limit_examples = N_TRAIN
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 1000
  c.prune.frequency = 2
  c.prune.prune_per_iteration = 300  # 10% of the 2880 units in one pruning step (288)
  c.prune.eval_examples = 0
  # No fine-tuning: the same code as every other run's (test_main_job.py); here it would only
  # compile ResNet-18's train step once more.
  c.prune.finetune_epochs = 0.0
  c.report.latency_repeats = c.report.latency_rounds = 1
  # Off: the checks before training compile ResNet-18 twice more (masked and surgered probe) and
  # re-trace it at every surgery. What they would check here is checked elsewhere: ResNet-18's
  # masking == surgery in test_models.py, the main job running them in test_any_model_e2e.py.
  c.prune.check_groups = False
  return c


# Every test here uses the session-scoped ``mock_run``: one pytest-xdist worker runs them all
# (run_tests.sh: --dist loadgroup), so that it is built once, not once per worker (session scope:
# not torn down and rebuilt when the worker runs another module's test in between).
pytestmark = pytest.mark.xdist_group('imagenet_mock_run')


@pytest.fixture(scope='session')
def mock_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('imagenet_mock')
  data_dir, workdir = str(tmp / 'tfds'), str(tmp / 'run')
  _write_metadata(data_dir)
  pth = str(tmp / 'resnet18.pth')
  torch.save(R.randomize(R.resnet18(), seed=3).state_dict(), pth)
  with tfds.testing.mock_data(num_examples=N_TRAIN, data_dir=data_dir,
                              as_data_source_fn=_as_data_source):
    result = run.run(_config(data_dir, pth), workdir)
  return workdir, result


def test_report_and_pruned_widths(mock_run):
  workdir, result = mock_run
  with open(os.path.join(workdir, 'report.json')) as f:
    rep = json.load(f)
  assert rep['config']['dataset'] == 'imagenet2012'
  full = models.full_widths('resnet18')
  pruned = rep['pruned']['widths']
  prunable = [g.name for g in models.create('resnet18', 1000).groups() if g.prunable]
  kept = sum(pruned[g] for g in prunable) / sum(full[g] for g in prunable)
  assert kept == pytest.approx(0.9, abs=1 / 2880)
  assert any(pruned[g] < full[g] for g in full)
  assert all(pruned[g] <= full[g] for g in full)
  assert len(rep['history']) == 1
  assert rep['pruned']['params'] < rep['baseline']['params']
  assert rep['pruned']['flops'] < rep['baseline']['flops']
  for key in ('baseline', 'pruned'):
    # Shares of the N_VAL validation examples (k / N_VAL); a top-1 hit is a top-5 hit.
    for acc in ('test_accuracy', 'test_top5_accuracy'):
      assert rep[key][acc] * N_VAL == pytest.approx(round(rep[key][acc] * N_VAL), abs=1e-4)
    assert rep[key]['test_accuracy'] <= rep[key]['test_top5_accuracy']
    assert rep[key]['latency_ms_b64'] > 0
  # The baseline is the converted network itself (no baseline training took place).
  assert rep['baseline']['step'] == 0
  assert result['pruned']['widths'] == pruned


def test_imagenet_table_from_mock_run(mock_run, tmp_path, capsys):
  import imagenet_table  # experiments/
  workdir, _ = mock_run
  out = str(tmp_path / 'table')
  assert imagenet_table.main([workdir, f'--out={out}']) == 0
  md = open(out + '.md').read()
  assert '| ResNet-18 | no pruning |' in md
  assert '| ResNet-18 | Taylor-FO-BN-90% |' in md
  lines = open(out + '.csv').read().strip().splitlines()
  assert lines[0].startswith('network,method,top1_err,top5_err,params_1e7,gflops')
  assert len(lines) == 3
  rep = json.load(open(os.path.join(workdir, 'report.json')))
  pruned_row = lines[2].split(',')
  assert float(pruned_row[2]) == pytest.approx(100 * (1 - rep['pruned']['test_accuracy']))
  assert float(pruned_row[5]) == pytest.approx(rep['pruned']['flops'] / 1e9)
  assert 'Taylor-FO-BN-90%' in capsys.readouterr().out

