"""The paper's tables on the CoOp datasets: `python examples/benchmark.py --protocol few_shot --data_root DATA`.

The same as `dpt-peft benchmark` (see --help): a resumable grid of runs, then results.md, results.csv and plots.
"""

import sys

from dpt_peft.cli import main

if __name__ == "__main__":  # as `dpt-peft benchmark`: a refusal is one line (--verbose: the traceback)
    main(["benchmark", *sys.argv[1:]])
