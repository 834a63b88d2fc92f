"""What the command lines (study/run.py, study/eval.py, reports/build.py) share: the parser, the default
experiment, SIGTERM as Ctrl-C, and the exit codes: 2 and one line for bad input, 130 when interrupted."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError

DEFAULT_EXPERIMENT = "liquid-diffusion"
BASELINE_ARM = "baseline"  # the arm the report compares every other arm with
# Without $MLFLOW_TRACKING_URI every command uses this store: MLflow 3.7+ defaults to it too, while older
# MLflow would write a ./mlruns folder, so the commands would not find each other's runs across versions.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


# The stores MLflow can track to (its registry is private): a scheme, and an optional +driver for SQLAlchemy.
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
SERVER_PROBE_SECONDS = 5


def check_tracking_uri(uri: str) -> None:
    """ConfigError for a tracking URI with an unknown scheme, or a tracking server that does not answer.

    MLflow would retry a dead server for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, with back-off) before
    failing with a stack trace; one probe of its /health endpoint says the same in seconds.
    """
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme and scheme not in TRACKING_SCHEMES and "://" in uri:
        raise ConfigError(f"tracking URI '{uri}': unknown scheme '{scheme}'; valid: {', '.join(TRACKING_SCHEMES)}")
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_PROBE_SECONDS).close()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(
                f"tracking server {uri} does not answer ({reason}); start it (mlflow server ...) or fix "
                f"MLFLOW_TRACKING_URI / --tracking-uri"
            ) from None


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3's UI opens in its GenAI view (traces, "No data") unless the address asks for the Model training one; the
# view is kept only in the browser's localStorage, and the experiment's mlflow.experimentKind tag does not set it.
TRAINING_VIEW = "workflowType=machine_learning"


def runs_page(ui: str, experiment_id: str, run_id: str = "") -> str:
    """The address of an experiment's runs (or one run) in MLflow's UI, in the Model training view."""
    run = f"/{run_id}" if run_id else ""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs{run}?{TRAINING_VIEW}"


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: `mlruns/` beside the database file.

    MLflow's own default is ./mlruns under whatever folder the command happens to start in, so two stores
    used from one folder (a user's, and a test's) would share artifact folders, and one store used from two
    folders would scatter its runs. None for other stores, whose server or settings decide."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a command trains or samples: --cache-dir, --device and --no-progress (run.py and eval.py)."""
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="latent, classifier and reference-statistics cache "
        "(default: $LIQUID_DIFFUSION_CACHE or ~/.cache/liquid_diffusion)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit 2, like every other error here."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(lowest: int):
    """An argparse type: an integer >= lowest, or a one-line usage error naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lowest:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected an integer >= {lowest}")
        return value

    return parse


def float_between(low: float, high: float = math.inf):
    """An argparse type: a number strictly between low and high, or a one-line usage error naming the value."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low < value < high:
            bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected a number {bounds}")
        return value

    return parse


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so a terminated command (a closed notebook, a cluster's scheduler)
    cleans up exactly as after a Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(main: Callable[[], int], prog: str, on_interrupt: str) -> int:
    """main()'s exit code, with the error handling every command line here shares.

    Bad input (ConfigError, DataError among them) is one line on stderr and exit code 2; Ctrl-C or
    SIGTERM says `on_interrupt` and exits 130; a reader that stops early (`run.py --list | head`) is
    not an error worth a traceback. argparse's own usage errors have printed their line and give 2.
    """
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    try:
        with sigterm_as_interrupt():
            return main()
    except SystemExit as err:  # argparse's usage errors and --help, already printed
        return err.code
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {on_interrupt}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader closed the pipe: point stdout at /dev/null so that Python's flush at exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
