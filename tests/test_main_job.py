"""The main job end to end in small: kill -9 and resume gives the same result as an
uninterrupted run; a pruned model restores in a fresh process; bad input fails early and
clearly without touching what is saved."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough for the suite, long enough for what the tests need: 4 pruning steps (the kill lands
# after the second is saved, with two to go), checkpoints inside every phase.
SMALL = ['--config=configs/default.py', '--config.train.limit_examples=1024',
         '--config.train.batch_size=64', '--config.train.epochs=1',
         '--config.train.checkpoint_every_steps=5', '--config.train.log_every_steps=4',
         '--config.train.limit_eval_examples=500', '--config.train.eval_batch_size=250',
         '--config.prune.frequency=3', '--config.prune.prune_per_iteration=12',
         '--config.prune.target_flops_reduction=0.3', '--config.prune.finetune_epochs=0.5',
         '--config.prune.eval_examples=250', '--config.report.latency_repeats=1',
         '--config.report.latency_rounds=1']


def _main(workdir, *extra, wait=True):
  cmd = [sys.executable, '-m', 'taylor_jax.main', f'--workdir={workdir}', *SMALL, *extra]
  env = dict(os.environ, PYTHONPATH=ROOT)
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _report(workdir):
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)


# The tests that use the session-scoped ``uninterrupted`` run on one pytest-xdist worker (run_tests.sh:
# --dist loadgroup), so that it is built once, not once per worker (session scope:
# not torn down and rebuilt when the worker runs another module's test in between).
SHARED = pytest.mark.xdist_group('main_job_uninterrupted')


@pytest.fixture(scope='session')
def uninterrupted(tmp_path_factory, fashion_mnist_data_dir):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  proc = _main(workdir, f'--config.data_dir={fashion_mnist_data_dir}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


@SHARED
def test_report_has_baseline_and_pruned(uninterrupted):
  rep = _report(uninterrupted)
  for key in ('baseline', 'pruned'):
    for field in ('test_accuracy', 'params', 'flops', 'latency_ms_b64'):
      assert field in rep[key], (key, field)
  assert rep['pruned']['flops'] <= 0.7 * rep['baseline']['flops']
  assert rep['pruned']['params'] < rep['baseline']['params']
  assert len(rep['history']) >= 1
  assert os.path.exists(os.path.join(uninterrupted, 'report.md'))
  assert os.path.exists(os.path.join(uninterrupted, 'pruning.png'))


@SHARED
def test_kill_and_resume_matches_uninterrupted(uninterrupted, tmp_path, fashion_mnist_data_dir):
  workdir = str(tmp_path / 'killed')
  proc = _main(workdir, f'--config.data_dir={fashion_mnist_data_dir}', wait=False)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 500
  # Kill -9 in the middle of pruning, after at least one pruning step was checkpointed.
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and open(metrics).read().count('"prune_step"') >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, 'the run finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, 'report.json'))
  resumed = _main(workdir, f'--config.data_dir={fashion_mnist_data_dir}')
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  a, b = _report(uninterrupted), _report(workdir)
  assert a['pruned']['widths'] == b['pruned']['widths']
  for key in ('test_accuracy', 'test_loss', 'params', 'flops'):
    assert a['pruned'][key] == pytest.approx(b['pruned'][key], rel=1e-5, abs=1e-6), key
  assert a['baseline']['test_loss'] == pytest.approx(b['baseline']['test_loss'], rel=1e-6)
  assert [h['units_kept'] for h in a['history']] == [h['units_kept'] for h in b['history']]


@SHARED
def test_evaluate_mode_restores_pruned_model_in_fresh_process(uninterrupted,
                                                              fashion_mnist_data_dir):
  proc = subprocess.run(
      [sys.executable, '-m', 'taylor_jax.main', f'--workdir={uninterrupted}', '--mode=evaluate',
       '--config=configs/default.py', f'--config.data_dir={fashion_mnist_data_dir}',
       '--config.train.eval_batch_size=250'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rep = _report(uninterrupted)
  line = [l for l in proc.stdout.splitlines() if l.startswith('restored')][0]
  acc = float(line.split('test_accuracy=')[1].split()[0])
  assert acc == pytest.approx(rep['pruned']['test_accuracy'], abs=1e-4)
  assert f"params={rep['pruned']['params']:,}" in line


@SHARED
def test_incompatible_checkpoint_is_refused_and_kept(uninterrupted, fashion_mnist_data_dir):
  ckpt = os.path.join(uninterrupted, 'checkpoints')
  before = sorted(os.listdir(ckpt))
  proc = _main(uninterrupted, f'--config.data_dir={fashion_mnist_data_dir}',
               '--config.model=lenet3')
  assert proc.returncode != 0
  assert "holds a checkpoint of model='resnet8'" in proc.stderr
  assert 'Use another --workdir' in proc.stderr
  assert sorted(os.listdir(ckpt)) == before


def test_latency_aware_ranking_measures_its_table_once_and_reaches_the_target(
    tmp_path, fashion_mnist_data_dir):
  workdir = str(tmp_path / 'latency_aware')
  # Shorter than SMALL, and max_share 0.25 leaves 6 networks in the table (compiled one by one).
  # The seed notes' criterion (bn_scale_grad) by name: the engine runs any registered estimator.
  proc = _main(workdir, f'--config.data_dir={fashion_mnist_data_dir}',
               '--config.prune.estimator=bn_scale_grad',
               '--config.prune.rank_by=score_per_latency', '--config.train.limit_examples=512',
               '--config.prune.finetune_epochs=0.25', '--config.prune.eval_examples=0',
               '--config.prune.max_share=0.25', '--config.prune.target_flops_reduction=0.15')
  assert proc.returncode == 0, proc.stderr[-4000:]
  rep = _report(workdir)
  table = rep['latency_table']
  # default.py aligns to 8: the multiples of 8 from 3/4 of the full width (max_share) up to it
  full = {'stage1': 16, 'stage1.block0': 16, 'stage2': 32, 'stage2.block0': 32, 'stage3': 64,
          'stage3.block0': 64}
  assert {k: sorted(map(int, t)) for k, t in table.items()} == {
      k: list(range(-(-(3 * w // 4) // 8) * 8, w + 1, 8)) for k, w in full.items()}
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['table'] for r in records if r['phase'] == 'latency_table'] == [table]
  assert rep['pruned']['flops'] <= 0.85 * rep['baseline']['flops']
  assert rep['config']['prune']['estimator'] == 'bn_scale_grad'
  steps = [r for r in records if r['phase'] == 'prune_step']
  assert steps and all(r['units_kept'] < 224 for r in steps)
