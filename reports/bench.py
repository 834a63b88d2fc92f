"""Time reports/build.py on a generated store: `python reports/bench.py [--runs 200]` prints the seconds.

The target is 200 runs with histories in 30 s or less on our 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200, help="trial runs: 10 arms x runs/10 seeds (default 200)")
    args = parser.parse_args()
    import mlflow

    from reports.build import build
    from reports.synthetic import make_experiment

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        seeds = max(1, args.runs // 10)
        arms = {("baseline" if a == 0 else f"arm{a}"): [10.0 + a + 0.1 * s for s in range(seeds)] for a in range(10)}
        start = time.perf_counter()
        make_experiment(mlflow.MlflowClient(uri), "bench", arms, grids=True, evals=10, loss_points=200)
        made = time.perf_counter() - start
        result = build("bench", Path(tmp) / "out", "baseline")
        print(
            f"store of {result['runs']} runs (200 loss points and 10 evaluations each) made in {made:.1f} s; "
            f"report built in {result['seconds']:.1f} s ({result['pages']} PDF pages); target <= 30 s"
        )


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    main()
