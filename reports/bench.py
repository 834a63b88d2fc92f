"""Time reports/build.py on a generated store: `python reports/bench.py [--runs 200] [--server]` prints the seconds.

The target is 200 runs with histories in 30 s or less on our 2-core CPU. With --server the same store is also
served by `mlflow server` on a free loopback port and the report is built again through it (one request per
run and metric instead of one SQL query per metric; target 60 s), and the two summary.csv files are compared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200, help="trial runs: 10 arms x runs/10 seeds (default 200)")
    parser.add_argument("--server", action="store_true", help="also build through an mlflow server on the store")
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
        if args.server:
            with served(uri, tmp) as url:
                mlflow.set_tracking_uri(url)
                through = build("bench", Path(tmp) / "served", "baseline")
            same = (Path(tmp) / "out" / "summary.csv").read_text() == (Path(tmp) / "served" / "summary.csv").read_text()
            print(
                f"through mlflow server: report built in {through['seconds']:.1f} s (target <= 60 s), "
                f"{through['seconds'] / result['seconds']:.1f}x the sqlite time; summary.csv "
                + ("identical" if same else "DIFFERS")
            )


@contextlib.contextmanager
def served(backend_uri: str, folder: str):
    """`mlflow server` on a free loopback port over `backend_uri`; its URL once /health answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1", "--port", str(port)]
    with open(Path(folder) / "server.log", "w") as log:
        server = subprocess.Popen([*command, "--workers", "2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(Path(folder) / 'server.log').read_text()[-1000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    main()
