"""Scale check: Fisher and SIG importance for a >100M-parameter transformer LM on this CPU.

    python benchmarks/elephants_scale.py           # writes benchmarks/results/elephants_scale.{jsonl,md}
    python benchmarks/elephants_scale.py --quick   # tiny sizes, prints only (rows in $TMPDIR)

The same as ``python -m experiments.elephants scale [--quick]``: the code is
``experiments/elephants/scale.py`` (the experiments layer; benchmarks import
from it, not the other way round).
"""
import argparse
import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the checkout
  from experiments.elephants import scale

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes, rows in $TMPDIR, nothing written to results")
  scale.main(quick=p.parse_args().quick)
