"""Reliability benchmark: a small main job killed (SIGKILL) at random moments and resumed ends
exactly as the uninterrupted run.

  .venv/bin/python experiments/bench_kill_resume.py [--kills 10] [--seed 0]

Runs the job (LeNet3 on 512 Fashion-MNIST examples: 8 baseline steps, Taylor-FO-BN pruning
to -20% FLOPs with surgery, 4 fine-tuning steps, report; a checkpoint every 2 steps; LeNet3
rather than ResNet-8 because compiling dominates such a short run, and the machine is shared) once uninterrupted, then
``--kills`` times from scratch: kill -9 at a moment drawn uniformly over the uninterrupted run's
wall time, re-run the same command until it finishes (every third trial is killed a second time,
during its resume). Each resumed run is compared with the uninterrupted one, bit for bit:

* the report (accuracies, losses, parameters, FLOPs, widths, every pruning step's record), less
  what is measured rather than computed (wall times, latencies);
* every array of the final checkpoint's train state (params, BN statistics, optimizer state,
  masks, scores), by SHA-256;
* metrics.jsonl, each (phase, step) record's last occurrence (a resumed run repeats the steps
  after its last checkpoint), less wall times.

Writes experiments/results/kill_resume.{json,md}.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = ['--config=configs/fashion_mnist_lenet3_baseline.py', '--config.prune.enabled=True',
         '--config.train.limit_examples=512',
         '--config.train.batch_size=64', '--config.train.epochs=1',
         '--config.train.checkpoint_every_steps=2', '--config.train.log_every_steps=2',
         '--config.train.limit_eval_examples=500', '--config.train.eval_batch_size=250',
         '--config.prune.frequency=2', '--config.prune.prune_per_iteration=48',
         '--config.prune.target_flops_reduction=0.2', '--config.prune.finetune_epochs=0.5',
         '--config.prune.eval_examples=250', '--config.report.latency_repeats=1',
         '--config.report.latency_rounds=1']

# Measured, not computed: they differ between any two runs.
_MEASURED = ('wall_s', 'wall_s_this_process', 'timing', 'latency_ms_b1', 'latency_ms_b64',
             'seconds')  # 'seconds': how long the group check before training took


EXTRA: list[str] = []  # --user_data: a user's model and arrays instead of the zoo and TFDS

USER_MODEL = 'taylor_jax.models.examples.concat_cnn:ConcatCNN'


def _write_user_data(path):
  """A user's arrays as a .npz: 1,024 training and 500 test Fashion-MNIST images."""
  from taylor_jax.data import fashion_mnist_debian
  (xtr, ytr), (xte, yte) = [fashion_mnist_debian.read_split(s) for s in ('train', 'test')]
  np.savez(path, x_train=xtr[:1024], y_train=ytr[:1024], x_test=xte[:500], y_test=yte[:500])


def _cmd(workdir, data_dir):
  return [sys.executable, '-m', 'taylor_jax.main', f'--workdir={workdir}', *FLAGS, *EXTRA] + (
      [f'--config.data_dir={data_dir}'] if data_dir else [])


def _start(workdir, data_dir, log):
  return subprocess.Popen(_cmd(workdir, data_dir), cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=log)


def _strip(x):
  if isinstance(x, dict):
    return {k: _strip(v) for k, v in x.items() if k not in _MEASURED}
  if isinstance(x, list):
    return [_strip(v) for v in x]
  return x


def _report(workdir):
  with open(os.path.join(workdir, 'report.json')) as f:
    return _strip(json.load(f))


def _metrics(workdir):
  last = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      last[(r['phase'], r.get('step'), r.get('prune_step'))] = _strip(r)
  return last


def _state_hash(workdir):
  import jax  # noqa: deferred: the runs themselves are subprocesses
  from taylor_jax import run
  _, state, meta = run.restore(workdir)
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]:
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode() + a.tobytes())
  return h.hexdigest(), int(state.step), meta['phase']


def _on_disk(workdir):
  """What a kill left: the checkpoint steps and the phase of the last metrics record."""
  d = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []
  phase = 'startup'
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    lines = open(path).read().splitlines()
    if lines:
      r = json.loads(lines[-1])
      phase = f"{r['phase']} (step {r.get('step')})"
  return {'checkpoints': steps, 'last_metrics': phase}


def _kill_at(proc, seconds):
  """SIGKILL after ``seconds``; False when the run finished first."""
  deadline = time.time() + seconds
  while time.time() < deadline:
    if proc.poll() is not None:
      return False
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  return True


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--kills', type=int, default=10, help='trials, each killed at least once')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--data_dir', default=None)
  ap.add_argument('--user_data', action='store_true',
                  help=f'a user model ({USER_MODEL}) on a user .npz dataset')
  ap.add_argument('--out', default=None, help='default: experiments/results/kill_resume'
                                              '[_user_data]')
  args = ap.parse_args()
  args.out = args.out or os.path.join(ROOT, 'experiments', 'results',
                                      'kill_resume' + ('_user_data' if args.user_data else ''))
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix='kill_resume_')
  if args.user_data:
    npz = os.path.join(root, 'user_arrays.npz')
    _write_user_data(npz)
    EXTRA[:] = [f'--config.dataset={npz}', f'--config.model={USER_MODEL}']
  logs = open(os.path.join(root, 'runs.log'), 'w')
  t0 = time.time()

  ref = os.path.join(root, 'uninterrupted')
  start = time.time()
  subprocess.run(_cmd(ref, args.data_dir), cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                 stdout=logs, stderr=logs, check=True)
  wall = time.time() - start
  ref_report, ref_metrics, ref_state = _report(ref), _metrics(ref), _state_hash(ref)
  print(f'uninterrupted: {wall:.1f} s, final step {ref_state[1]}', flush=True)

  trials = []
  for i in range(args.kills):
    workdir = os.path.join(root, f'trial{i}')
    kills = []
    at = rng.uniform(0.0, 0.95 * wall)
    proc = _start(workdir, args.data_dir, logs)
    if _kill_at(proc, at):
      kills.append({'at_s': round(at, 2), **_on_disk(workdir)})
    runs = 1
    if i % 3 == 2 and kills:  # a second kill, during the resume
      again = rng.uniform(0.0, wall / 2)
      proc = _start(workdir, args.data_dir, logs)
      runs += 1
      if _kill_at(proc, again):
        kills.append({'at_s': round(again, 2), 'during': 'resume', **_on_disk(workdir)})
    start = time.time()
    proc = _start(workdir, args.data_dir, logs)
    rc = proc.wait()
    runs += 1
    resume_s = time.time() - start
    same = {'exit_status_0': rc == 0}
    if rc == 0:
      same['report'] = _report(workdir) == ref_report
      same['final_state_sha256'] = _state_hash(workdir) == ref_state
      same['metrics'] = _metrics(workdir) == ref_metrics
    trials.append({'trial': i, 'kills': kills, 'processes': runs,
                   'last_resume_s': round(resume_s, 1), 'identical': same,
                   'all_identical': all(same.values()) and len(same) == 4})
    print(f'trial {i}: kills {kills} -> {same}', flush=True)
    shutil.rmtree(workdir, ignore_errors=True)

  n_kills = sum(len(t['kills']) for t in trials)
  import jax
  result = {
      'command': 'PYTHONPATH=. .venv/bin/python -m taylor_jax.main --workdir=DIR ' + ' '.join(
          FLAGS + EXTRA),
      'benchmark': f'.venv/bin/python experiments/bench_kill_resume.py --kills {args.kills} '
                   f'--seed {args.seed}' + (' --user_data' if args.user_data else ''),
      'device': f'{jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cores)',
      'uninterrupted_wall_s': round(wall, 1), 'final_step': ref_state[1],
      'reference_state_sha256': ref_state[0],
      'kills': n_kills, 'trials': len(trials),
      'trials_killed': sum(1 for t in trials if t['kills']),
      'trials_identical': sum(1 for t in trials if t['all_identical']),
      'total_wall_s': round(time.time() - t0, 1), 'trial_records': trials}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(result, f, indent=1)
  lines = [f"# Kill -9 and resume: {result['trials_identical']} of {result['trials']} trials "
           f"identical to the uninterrupted run ({n_kills} kills)", '',
           f"Benchmark: `{result['benchmark']}` ({result['device']}, "
           f"{result['total_wall_s'] / 60:.1f} min). Each trial runs", '',
           f"`{result['command']}`", '',
           'from scratch, is killed (SIGKILL) at a random moment, and is re-run until it '
           'finishes; compared with the uninterrupted run: report (less wall times and '
           'latencies), SHA-256 of every array of the final train state, metrics.jsonl.', '',
           '| trial | killed at (s) | left on disk at the kill: checkpoints / last metrics '
           '| processes | report | state | metrics |', '|---|---|---|---|---|---|---|']
  for t in trials:
    at = ' + '.join(f"{k['at_s']}" for k in t['kills']) or 'not killed'
    disk = '; '.join(f"{k['checkpoints']} / {k['last_metrics']}" for k in t['kills'])
    s = t['identical']
    lines.append(f"| {t['trial']} | {at} | {disk} | {t['processes']} | "
                 f"{'same' if s.get('report') else 'DIFFERENT'} | "
                 f"{'same' if s.get('final_state_sha256') else 'DIFFERENT'} | "
                 f"{'same' if s.get('metrics') else 'DIFFERENT'} |")
  lines += ['', f"Uninterrupted run: {result['uninterrupted_wall_s']} s, final step "
            f"{result['final_step']}, state SHA-256 `{result['reference_state_sha256'][:16]}...`."]
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  shutil.rmtree(root, ignore_errors=True)
  return 0 if result['trials_identical'] == result['trials'] and n_kills >= args.kills else 1


if __name__ == '__main__':
  sys.exit(main())
