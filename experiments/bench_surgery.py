"""Benchmark: the same pruning run with surgery between pruning steps vs masked only (the
reference's way), both from one baseline checkpoint.

  .venv/bin/python experiments/bench_surgery.py [--align 8 1] [--baseline_epochs 2]

Reports the wall time of pruning plus fine-tuning and the final latency (batch 1 and 64) of each
run, and writes them to experiments/results/bench_surgery.{json,md}.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *flags):
  cmd = [sys.executable, '-m', 'taylor_jax.main', f'--workdir={workdir}', *flags]
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                 stdout=subprocess.DEVNULL)
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--runs', default=os.path.join(ROOT, 'runs', 'bench_surgery'))
  ap.add_argument('--align', type=int, nargs='*', default=[8])
  ap.add_argument('--baseline_epochs', type=float, default=None,
                  help='shorter baseline training (it only seeds the two pruning runs)')
  ap.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results',
                                                'bench_surgery.json'))
  args = ap.parse_args()
  import jax
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
  baseline = os.path.join(args.runs, 'baseline')
  _main(baseline, '--config=configs/fashion_mnist_resnet8_baseline.py',
        *([f'--config.train.epochs={args.baseline_epochs}'] if args.baseline_epochs else []))
  rows = []
  for align in args.align:
    for surgery in (True, False):
      name = f"{'surgery' if surgery else 'masked'}_align{align}"
      load_before = os.getloadavg()
      rep = _main(os.path.join(args.runs, name), '--config=configs/default.py',
                  f'--config.train.init_checkpoint={baseline}',
                  f'--config.prune.surgery={surgery}', f'--config.prune.align={align}')
      t = rep['timing']
      rows.append({'run': name, 'surgery': surgery, 'align': align,
                   'prune_wall_s': t['prune_wall_s'], 'finetune_wall_s': t['finetune_wall_s'],
                   'wall_s': t['prune_wall_s'] + t['finetune_wall_s'],
                   'test_accuracy': rep['pruned']['test_accuracy'],
                   'flops': rep['pruned']['flops'], 'params': rep['pruned']['params'],
                   'latency_ms_b1': rep['pruned']['latency_ms_b1'],
                   'latency_ms_b64': rep['pruned']['latency_ms_b64'],
                   'baseline_latency_ms_b64': rep['baseline']['latency_ms_b64'],
                   # 1-min load averages: the machine is shared; compare runs made at equal load.
                   'load_average_before': load_before[0], 'load_average_after': os.getloadavg()[0]})
  by = {r['run']: r for r in rows}
  result = {'device': device, 'command': ' '.join(['.venv/bin/python'] + sys.argv),
            'align_of_headline': args.align[0],
            'masked_wall_s': by[f'masked_align{args.align[0]}']['wall_s'],
            'surgery_wall_s': by[f'surgery_align{args.align[0]}']['wall_s'],
            'runs': rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.splitext(args.out)[0] + '.md', 'w') as f:
    f.write(f"# Surgery vs masked-only pruning ({device})\n\n`{result['command']}`\n\n")
    f.write('| run | prune+finetune wall (s) | test acc | FLOPs | latency b1 (ms) | latency b64 (ms) |\n')
    f.write('|---|---|---|---|---|---|\n')
    for r in rows:
      f.write(f"| {r['run']} | {r['wall_s']:.1f} | {r['test_accuracy']:.4f} | {r['flops']:,} | "
              f"{r['latency_ms_b1']:.3f} | {r['latency_ms_b64']:.2f} |\n")
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
