"""The experiment scripts at tiny size: the oracle-correlation script end to end on synthetic data
(generic, CIFAR-shaped path), and the greedy pruning curve against a brute-force loop."""

from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import oracle_correlation, pruning_curves
from taylor_jax import models, scoring


def test_oracle_correlation_end_to_end_synthetic(tmp_path):
  out = tmp_path / 'out'
  argv = ['--dataset=synthetic', '--image_size=16', '--seeds=0',
          '--configs=configs/fashion_mnist_lenet3_baseline.py', '--epochs=1',
          '--set=train.limit_examples=128', '--set=train.batch_size=64',
          '--set=train.limit_eval_examples=128', '--set=report.latency_repeats=1',
          '--set=report.latency_rounds=1',
          '--examples=128', '--batch_size=64',
          '--estimators=taylor_fo_bn,taylor_so,weight_l2,random,bn_scale',
          f'--workdir_root={tmp_path / "runs"}', f'--out={out}']
  res = oracle_correlation.main(argv)
  with open(out / 'oracle_correlation_synthetic.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0].keys()) == ['model', 'estimator', 'seed', 'spearman', 'kendall', 'pearson']
  # bn_scale does not apply to LeNet3 (no BatchNorm): skipped and said so, not a NaN row.
  assert sorted(r['estimator'] for r in rows) == ['random', 'taylor_fo_bn', 'taylor_so',
                                                  'weight_l2']
  # The CSV holds the squared-oracle correlations the script computed, column by column (the
  # abs-oracle rows differ from them: they go to the _abs.csv).
  computed = {r['estimator']: r for r in res['rows'] if r['oracle'] == 'squared'}
  for r in rows:
    assert r['model'] == 'lenet3' and r['seed'] == '0'
    for m in ('spearman', 'kendall', 'pearson'):
      assert np.isfinite(float(r[m]))
      assert float(r[m]) == pytest.approx(computed[r['estimator']][m], abs=1e-6), (r, m)
  with open(out / 'oracle_correlation_synthetic_per_layer.csv') as f:
    layers = {r['layer'] for r in csv.DictReader(f)}
  assert layers == {'conv1', 'conv2', 'fc1', 'fc2'}
  md = (out / 'oracle_correlation_synthetic.md').read_text()
  assert 'bn_scale' in md and 'experiments/oracle_correlation.py' in md and '93%' in md
  assert (out / 'oracle_correlation_synthetic_scatter.png').stat().st_size > 1000
  # Estimators and the oracle saw the same data: the 'random' floor is far from the Taylor one.
  by = {r['estimator']: r for r in res['rows'] if r['oracle'] == 'squared'}
  assert by['taylor_fo_bn']['spearman'] > by['random']['spearman']


def _tiny_lenet(seed=0):
  model = models.create('lenet3', 10, image_size=16)
  rng = np.random.default_rng(seed)
  batch = {'image': jnp.asarray(rng.normal(size=(32, 16, 16, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 32), jnp.int32)}
  variables = dict(model.init(jax.random.key(seed), batch['image'][:1]))
  variables.setdefault('batch_stats', {})
  return model, variables, [batch]


def test_oracle_greedy_first_removal_is_best_single_removal():
  model, variables, batches = _tiny_lenet()
  pts = pruning_curves.greedy_curve('oracle', model, variables, batches, batches, chunk=1,
                                    max_units=1, input_shape=(16, 16, 3))
  ones = {g.name: np.ones(g.width, np.float32) for g in model.groups()}
  base = scoring.evaluate(model, variables, ones, batches)['loss']
  assert pts[0]['loss'] == pytest.approx(base, rel=1e-6)
  delta = {}  # brute force: every single removal, explicitly
  for g in model.groups():
    for u in range(g.width):
      m = {k: v.copy() for k, v in ones.items()}
      m[g.name][u] = 0
      delta[(g.name, u)] = scoring.evaluate(model, variables, m, batches)['loss'] - base
  best = min(abs(d) for d in delta.values())
  assert pts[1]['units_removed'] == 1
  [(group, [unit])] = pts[1]['removed'].items()
  # The removed unit is a best single removal (float ties may pick another equally good one).
  assert abs(delta[(group, unit)]) == pytest.approx(best, abs=1e-6)
  assert pts[1]['loss'] == pytest.approx(base + delta[(group, unit)], rel=1e-5, abs=1e-6)


def test_estimator_greedy_removes_lowest_and_flops_fall():
  model, variables, batches = _tiny_lenet(1)
  pts = pruning_curves.greedy_curve('weight_l2', model, variables, batches, batches, chunk=5,
                                    max_units=15, input_shape=(16, 16, 3))
  assert [p['units_removed'] for p in pts] == [0, 5, 10, 15]
  flops = [p['flops'] for p in pts]
  assert all(a > b for a, b in zip(flops, flops[1:]))
  assert pts[-1]['flops_removed_frac'] > 0
  # Weight norms do not change while units go (no training): the first chunk is the global
  # five lowest weight_l2 scores.
  ones = {g.name: np.ones(g.width, np.float32) for g in model.groups()}
  s = scoring.mean_scores('weight_l2', model, variables, ones, batches)
  flat = sorted((float(v[u]), k, u) for k, v in s.items() for u in range(v.size))[:5]
  want = {}
  for _, k, u in flat:
    want.setdefault(k, []).append(u)
  assert {k: sorted(v) for k, v in pts[1]['removed'].items()} == {k: sorted(v)
                                                                  for k, v in want.items()}
  # units_5pt: the units share of the last point before accuracy first falls 5 points below the
  # unpruned accuracy.
  summ = pruning_curves.curve_summary(pts)
  a0 = pts[0]['accuracy']
  within = [p['accuracy'] >= a0 - 0.05 for p in pts]
  last = within.index(False) - 1 if False in within else len(pts) - 1
  assert summ['units_5pt'] == pts[last]['units_removed_frac']
  assert summ['units_1pt'] <= summ['units_5pt']


def test_lenet3_groups_follow_the_input_size():
  """CIFAR-sized LeNet3 (the paper's correlation model): fc1 has 5 x 5 x 32 rows, not 4 x 4 x 32."""
  from taylor_jax.groups import check_groups
  model = models.create('lenet3', 10, input_shape=(32, 32, 3))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  check_groups(variables, model.groups())
  assert models.create('resnet8', 10, input_shape=(32, 32, 3)).widths == models.full_widths(
      'resnet8')


def test_compare_methods_variant_tokens_become_the_runs_flags():
  from experiments import compare_methods as cm

  class Args:
    epochs, finetune_epochs, limit_examples, limit_eval_examples, data_dir, override = (
        15.0, 3.0, None, None, None, [])

  cmd = cm.method_command(Args, 'estimator/weight_l2', 0.4, 1, '/w', '/base')
  assert '--config=configs/fashion_mnist_resnet20_taylor_fo_bn.py' in cmd
  assert '--config.prune.estimator=weight_l2' in cmd
  assert '--config.train.init_checkpoint=/base' in cmd and '--config.seed=1' in cmd
  cmd = cm.method_command(Args, 'taylor_fo_bn+prune.normalize=l2+prune.rank_by=score_per_flop',
                          0.25, 0, '/w', '/base')
  assert {'--config.prune.normalize=l2', '--config.prune.rank_by=score_per_flop'} <= set(cmd)
  assert cm.run_name('estimator/random+prune.normalize=l2') == 'estimator-random_prune.normalize-l2'
  with pytest.raises(ValueError, match='not key=value'):
    cm.parse_method('taylor_fo_bn+prune.normalize')
  with pytest.raises(ValueError, match="no estimator 'nope'"):
    cm.available_methods(['estimator/nope'])


def test_compare_methods_refuses_a_missing_or_mismatched_baseline_before_running(tmp_path):
  from experiments import compare_methods as cm
  argv = ['--methods=taylor_fo_bn', '--seeds=0', f'--runs_dir={tmp_path}/runs',
          f'--results_dir={tmp_path}/res', f'--baseline_dir={tmp_path}/base_s{{seed}}']
  with pytest.raises(SystemExit, match='has no report.json'):
    cm.main(argv)
  (tmp_path / 'base_s0').mkdir()
  (tmp_path / 'base_s0' / 'report.json').write_text('{"config": {"train": {"epochs": 30}}}')
  with pytest.raises(SystemExit, match='--epochs=30'):
    cm.main(argv)
  assert not (tmp_path / 'runs' / 'taylor_fo_bn_r40_s0').exists()


def test_oracle_correlation_refuses_a_missing_baseline_before_scoring(tmp_path):
  argv = ['--seeds=0', '--configs=configs/fashion_mnist_baseline.py', '--epochs=resnet20=15',
          '--estimators=taylor_fo_bn',
          f'--baseline_dir={tmp_path}/{{model}}_e{{epochs:g}}_s{{seed}}', f'--out={tmp_path}']
  with pytest.raises(SystemExit, match=f'{tmp_path}/resnet20_e15_s0'):
    oracle_correlation.main(argv)
  assert not list(tmp_path.iterdir())


def _finished_baseline(runs_dir, epochs, seed, accuracies):
  """A baseline workdir as converged_baselines reads it: curve records and a report."""
  import json
  wd = runs_dir / f'resnet20_e{epochs:g}_s{seed}'
  wd.mkdir(parents=True)
  with open(wd / 'metrics.jsonl', 'w') as f:
    for i, a in enumerate(accuracies):
      f.write(json.dumps({'phase': 'baseline_curve', 'step': i + 1, 'epoch': i + 1.0,
                          'test_accuracy': a, 'test_loss': 1 - a, 'wall_s': 10.0 * i}) + '\n')
  (wd / 'report.json').write_text(json.dumps({'baseline': {'test_accuracy': accuracies[-1]}}))


def test_converged_baselines_chosen_budget_follows_the_rule(tmp_path):
  from experiments import converged_baselines as cb
  runs, res = tmp_path / 'runs', tmp_path / 'res'
  argv = ['--runs=2:0,4:0,chosen:1', f'--runs_dir={runs}', f'--results_dir={res}',
          '--summarise_only']
  _finished_baseline(runs, 2, 0, [0.90, 0.9370])
  cb.main(argv)  # the 4-epoch run has not finished: chosen:1 waits, nothing fails
  assert 'not decided yet' in (res / 'converged_baselines.md').read_text()
  _finished_baseline(runs, 4, 0, [0.90, 0.92, 0.93, 0.9400])
  cb.main(argv)  # 93.70 is within 0.3 points of 94.00: 2 epochs, so seed 1 trains for 2
  md = (res / 'converged_baselines.md').read_text()
  assert 'seed 0: **2 epochs**' in md and '| 2 | 1 | not started |' in md
  (runs / 'resnet20_e4_s0' / 'report.json').write_text('{"baseline": {"test_accuracy": 0.95}}')
  cb.main(argv)  # 1.3 points below: the larger budget
  assert '| 4 | 1 | not started |' in (res / 'converged_baselines.md').read_text()
  with pytest.raises(SystemExit, match='chosen:S needs finished fixed budgets'):
    cb.main(['--runs=chosen:1', f'--runs_dir={runs}', f'--results_dir={res}'])


def test_converged_baselines_on_a_fresh_machine_reads_finished_runs_from_the_results(
    tmp_path, monkeypatch):
  """A session's machine may be new: runs finished (and committed) by an earlier session are
  read from converged_baselines.csv, not trained again, and still decide chosen:S."""
  from experiments import converged_baselines as cb
  old_runs, res = tmp_path / 'old_runs', tmp_path / 'res'
  _finished_baseline(old_runs, 2, 0, [0.90, 0.9370])
  _finished_baseline(old_runs, 4, 0, [0.90, 0.92, 0.93, 0.9400])
  cb.main(['--runs=2:0,4:0', f'--runs_dir={old_runs}', f'--results_dir={res}', '--summarise_only'])
  started = []
  monkeypatch.setattr(cb.compare_methods, 'run_main',
                      lambda cmd, wd, log: started.append(os.path.basename(wd)))
  cb.main(['--runs=2:0,4:0,chosen:1', f'--runs_dir={tmp_path}/new_runs', f'--results_dir={res}'])
  assert started == ['resnet20_e2_s1']  # 93.70 within 0.3 of 94.00: seed 1 trains 2 epochs
  md = (res / 'converged_baselines.md').read_text()
  assert '| 2 | 0 | 93.70% |' in md and '| 4 | 0 | 94.00% |' in md
  assert '| 2 | 1 | not started |' in md
  rows = (res / 'converged_baselines.csv').read_text().splitlines()
  assert len(rows) == 1 + 2 + 4  # the committed curves are kept, not dropped
  cb.main(['--runs=4:0', f'--runs_dir={tmp_path}/new_runs', f'--results_dir={res}',
           '--summarise_only'])  # also those this command does not name
  assert '| 2 | 0 | 93.70% |' in (res / 'converged_baselines.md').read_text()


def test_compare_methods_other_seeds_cut_the_compared_criteria_only(tmp_path, monkeypatch):
  from experiments import compare_methods as cm
  started = []
  monkeypatch.setattr(cm, 'run_main', lambda cmd, wd, log: started.append(os.path.basename(wd)))
  monkeypatch.setattr(cm, 'row', lambda method, red, seed, wd, kind: {})
  monkeypatch.setattr(cm, 'markdown', lambda rows, command, args, missing: '')
  monkeypatch.setattr(cm, 'plot', lambda rows, path: None)
  cm.main(['--methods=taylor_fo_bn,estimator/weight_l2', '--reductions=0.4', '--seeds=0,1',
           '--other_seeds=0', f'--runs_dir={tmp_path}/runs', f'--results_dir={tmp_path}/res'])
  assert started == ['baseline_s0', 'taylor_fo_bn_r40_s0', 'estimator-weight_l2_r40_s0',
                     'baseline_s1', 'taylor_fo_bn_r40_s1']


def test_compare_methods_on_a_fresh_machine_reads_finished_runs_from_the_results(
    tmp_path, monkeypatch):
  """Finished runs leave their row under <results_dir>/runs/; on a machine without their
  workdirs (a new session's) they are read from there, not re-run, and need no baseline."""
  import json
  import shutil
  from experiments import compare_methods as cm

  def fake_run(flags, wd, log):  # a finished run: the report fields row() reads
    os.makedirs(wd, exist_ok=True)
    acc = 0.9 if 'baseline_s' in wd else 0.8
    (tmp_path / 'ran.txt').open('a').write(os.path.basename(wd) + '\n')
    with open(os.path.join(wd, 'report.json'), 'w') as f:
      part = {'test_accuracy': acc, 'test_loss': 0.3, 'params': 10, 'flops': 100,
              'widths': {'stage1': 4}}
      json.dump({'baseline': dict(part, flops=200, test_accuracy=0.9), 'pruned': part,
                 'config': {'model': 'resnet20'}}, f)

  monkeypatch.setattr(cm, 'run_main', fake_run)
  monkeypatch.setattr(cm, 'markdown',
                      lambda rows, command, args, missing=(): json.dumps([rows, missing],
                                                                         sort_keys=True))
  monkeypatch.setattr(cm, 'plot', lambda rows, path: None)
  argv = ['--methods=taylor_fo_bn', '--reductions=0.4', '--seeds=0', f'--runs_dir={tmp_path}/runs',
          f'--results_dir={tmp_path}/res', '--results_name=r']
  cm.main(argv)
  first = (tmp_path / 'res' / 'r.md').read_text()
  assert sorted(os.listdir(tmp_path / 'res' / 'runs' / 'runs')) == [
      'baseline_s0.json', 'taylor_fo_bn_r40_s0.json']
  shutil.rmtree(tmp_path / 'runs')  # a new machine: the workdirs are gone, the results are not
  cm.main(argv)
  assert (tmp_path / 'ran.txt').read_text().split() == ['baseline_s0', 'taylor_fo_bn_r40_s0']
  assert (tmp_path / 'res' / 'r.md').read_text() == first
  # A --baseline_dir run is another script's, made with its own flags: read, never re-run.
  other = tmp_path / 'other_s0'
  fake_run(None, str(other), None)
  (other / 'flags.json').write_text(json.dumps(['--config.train.eval_every_epochs=1']))
  report = json.loads((other / 'report.json').read_text())
  report['config']['train'] = {'epochs': 15.0}
  (other / 'report.json').write_text(json.dumps(report))
  cm.main(argv[:3] + [f'--runs_dir={tmp_path}/runs2', f'--results_dir={tmp_path}/res',
                      f'--baseline_dir={tmp_path}/other_s{{seed}}', '--results_name=o'])
  ran = (tmp_path / 'ran.txt').read_text().split()
  assert ran.count('other_s0') == 1 and ran[-1] == 'taylor_fo_bn_r40_s0'  # made above, not run
  # A run not recorded yet still needs its baseline on this machine: a clear error, not hours.
  with pytest.raises(SystemExit, match='has no report.json'):
    cm.main(argv[:1] + ['--reductions=0.25', f'--baseline_dir={tmp_path}/gone_s{{seed}}',
                        *argv[2:]])
  # --recorded_only writes the tables from what finished and names what did not; runs nothing.
  cm.main(argv[:1] + ['--reductions=0.25,0.4', *argv[2:], '--recorded_only'])
  rows, missing = json.loads((tmp_path / 'res' / 'r.md').read_text())
  assert [r['flops_reduction'] for r in rows] == [0.0, 0.4]
  assert missing == [['taylor_fo_bn', 0.25, 0]]
  assert (tmp_path / 'ran.txt').read_text().split().count('taylor_fo_bn_r40_s0') == 2
  with pytest.raises(SystemExit, match='records a run made with'):
    cm.main(argv + ['--finetune_epochs=1'])
  # The baseline trained again on this machine is another network: its old rows are refused.
  fake_run(None, str(tmp_path / 'runs' / 'baseline_s0'), None)
  report = tmp_path / 'runs' / 'baseline_s0' / 'report.json'
  report.write_text(report.read_text().replace('"test_loss": 0.3', '"test_loss": 0.31'))
  with pytest.raises(SystemExit, match='another training of it'):
    cm.main(argv)


def test_compare_methods_refuses_a_workdir_of_a_run_with_other_flags(tmp_path):
  """Finished runs are read, not re-run: the same --runs_dir under another --baseline_dir must
  be an error, not the old run reported as the new one."""
  import json
  from experiments import compare_methods as cm
  wd = tmp_path / 'taylor_fo_bn_r40_s0'
  wd.mkdir()
  old = ['--config=configs/taylor_fo_bn.py', f'--workdir={wd}', '--config.seed=0',
         '--config.train.init_checkpoint=/runs/resnet20_e15_s0',
         '--config.prune.target_flops_reduction=0.4']
  (wd / 'report.json').write_text(json.dumps({'config': {
      'seed': 0, 'train': {'init_checkpoint': '/runs/resnet20_e15_s0'},
      'prune': {'target_flops_reduction': 0.4}}}))
  cm.run_main(old, str(wd), log=None)  # its own flags: finished, read as it is
  other = [f.replace('e15', 'e30') for f in old]
  with pytest.raises(SystemExit, match="init_checkpoint='/runs/resnet20_e15_s0', not "
                                       "'/runs/resnet20_e30_s0'"):
    cm.run_main(other, str(wd), log=None)
  with pytest.raises(SystemExit, match='target_flops_reduction=0.4, not .0.25'):
    cm.run_main(old[:-1] + ['--config.prune.target_flops_reduction=0.25'], str(wd), log=None)
  # An unfinished run: the flags it started with (flags.json) decide.
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  (unfinished / 'flags.json').write_text(json.dumps(old))
  with pytest.raises(SystemExit, match='holds a run started with'):
    cm.run_main(other, str(unfinished), log=None)


def test_run_wall_sums_every_process_of_a_resumed_run(tmp_path):
  import json
  from experiments import compare_methods as cm
  walls = [10.0, 20.0, None, 5.0, 15.0, 40.0, 3.0]  # two restarts; a record without wall_s
  (tmp_path / 'metrics.jsonl').write_text(''.join(
      json.dumps({'phase': 'baseline', **({} if w is None else {'wall_s': w})}) + '\n'
      for w in walls))
  assert cm.total_wall_s(str(tmp_path)) == 20.0 + 40.0 + 3.0
  assert cm.total_wall_s(str(tmp_path / 'missing')) == 0.0


def test_peer_torch_pruning_keeps_earlier_rows_and_names_what_it_cannot_measure(tmp_path):
  """The side-by-side table accumulates over sessions: rows of runs not on this machine are read
  back (never dropped by a command naming fewer importances), a pair asked for that no machine
  can now measure is listed as not measured, and a run neither here nor recorded is refused
  before any work."""
  pytest.importorskip('torch')
  from experiments import peer_torch_pruning as peer

  out = str(tmp_path / 'peer')
  with open(out + '.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, ['run', 'importance', 'torch_accuracy', 'torch_widths'])
    w.writeheader()
    w.writerow({'run': 'r_s0', 'importance': 'taylor', 'torch_accuracy': '0.94',
                'torch_widths': '{"stage1": 13}'})
    w.writerow({'run': 'r_s9', 'importance': 'magnitude', 'torch_accuracy': '0.9',
                'torch_widths': '{}'})
  done = peer.committed_rows(out)
  assert done[('r_s0', 'taylor')]['torch_widths'] == {'stage1': 13}  # json columns parsed
  here = tmp_path / 'runs' / 'r_s1'
  here.mkdir(parents=True)
  (here / 'report.json').write_text('{}')
  gone = str(tmp_path / 'runs' / 'r_s0')
  todo, rows, unmeasurable = peer.plan([gone, str(here)], ['taylor', 'bn_scale'], done, out,
                                       str(tmp_path / 'work'))
  assert todo == [(str(here), 'taylor'), (str(here), 'bn_scale')]
  assert set(rows) == {('r_s0', 'taylor'), ('r_s9', 'magnitude')}  # r_s9: not named, kept
  assert unmeasurable == [('r_s0', 'bn_scale')]
  with pytest.raises(SystemExit, match='no row of it'):
    peer.plan([str(tmp_path / 'runs' / 'r_s2')], ['taylor'], done, out, str(tmp_path / 'work'))


def test_compare_methods_table_shows_no_spread_for_one_seed_and_no_number_for_an_untimed_run():
  from experiments import compare_methods as cm
  assert cm._cell([94.771], 2) == '94.77'  # one seed: no '+- 0.00' that reads as no spread
  assert cm._cell([1.0, 2.0, 3.0], 1) == '2.0 +- 1.0'
  assert cm._cell([float('nan')], 2) == 'not timed'
  assert cm._cell([float('nan'), 4.0], 2) == '4.00 (1 of 2 timed)'
