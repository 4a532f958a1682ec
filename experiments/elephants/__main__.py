"""``python -m experiments.elephants <scenario|real|real_report|memory|scale|lora_lr|merge|report> [--quick]``.

* ``scenario [--seeds 0 1 2]``: pretrain on prose, fine-tune on Python per
  method and lambda, per seed; appends to ``results/scenario[-quick].jsonl``
  (resumable: runs already there, by seed, are skipped).
* ``real [--seeds 0]``: SmolLM2-135M-Instruct fine-tuned on Milton with every arm
  of ``real.GRID`` (seed 0) or ``real.SELECTED`` (other seeds); appends to
  ``results/real[-quick].jsonl`` (resumable). ``real_report``: its tables and
  figure -> ``results/real.md``, ``real.png``.
* ``memory``: bytes of params / optimizer / consolidation state per method,
  measured from compiled train steps -> ``results/memory.{json,md}``.
* ``scale``: importance time and peak memory for transformers up to 100M+
  parameters -> ``benchmarks/results/elephants_scale.{jsonl,md}``.
* ``lora_lr``: plain LoRA at three learning rates on seed 0, how the LoRA
  arms' rate was chosen -> ``results/lora_lr.md``.
* ``merge [--seeds 0 1 2]``: ``wj.fisher_merge`` of the pretrained and the
  plainly fine-tuned model vs plain averaging -> ``results/merge.{jsonl,md}``.
* ``report``: Pareto table and plots from the jsonl -> ``results/README.md``, ``*.png``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.elephants", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=["scenario", "real", "real_report", "memory", "scale", "lora_lr", "merge",
                                     "report"])
  p.add_argument("--quick", action="store_true", help="small, fast version (pipeline check)")
  p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                 help="real: 'cpu' (the committed CPU scenario) or 'gpu' (real.GPU: full length, real-gpu.jsonl)")
  p.add_argument("--max-runs", type=int, default=None,
                 help="real: stop after this many runs (run again to go on; a fresh process frees XLA's memory)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0],
                 help="scenario: independent replicates to run (default: 0); finished ones are skipped")
  args = p.parse_args(argv)
  if args.command == "scenario":
    from experiments.elephants import scenario
    scenario.run_seeds(scenario.QUICK if args.quick else scenario.Scenario(), args.seeds)
  elif args.command == "real":
    from experiments.elephants import real
    cfg = real.QUICK if args.quick else real.GPU if args.preset == "gpu" else real.Config()
    for seed in args.seeds:
      real.run((seed,), cfg, real.grid_for(seed, args.quick), max_runs=args.max_runs)
  elif args.command == "real_report":
    from experiments.elephants import real_report
    print(real_report.main(name="real-quick" if args.quick else "real-gpu" if args.preset == "gpu" else "real"))
  elif args.command == "memory":
    from experiments.elephants import memory
    memory.main(quick=args.quick)
  elif args.command == "lora_lr":
    from experiments.elephants import scenario
    scenario.lora_lr(scenario.QUICK if args.quick else scenario.Scenario())
  elif args.command == "merge":
    from experiments.elephants import merge
    print(merge.main(args.seeds))
  elif args.command == "scale":
    from experiments.elephants import scale
    scale.main(quick=args.quick)
  else:
    from experiments.elephants import report
    report.main(quick=args.quick)
  return 0


if __name__ == "__main__":
  sys.exit(main())
