"""Re-evaluate a finished run from its saved EMA weights, e.g. a 10k-sample FID after a 1k-sample sweep.

The values go into the same MLflow run under `eval_n{N}/<metric>`, at the step where training
ended, so they never mix with the training-time `eval/` history. The run's status is not touched.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liquid_diffusion.cli import (  # noqa: E402
    OneLineParser,
    add_runtime_arguments,
    check_tracking_uri,
    int_at_least,
    run_command,
)
from liquid_diffusion.config import METRICS, ConfigError, ExperimentConfig  # noqa: E402
from study.weights import add_weights_arguments, inception_weights_for  # noqa: E402


def metric_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    bad = [name for name in names if name not in METRICS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown metric {', '.join(bad) or repr(text)}; valid: {', '.join(METRICS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="eval.py", description=__doc__)
    parser.add_argument("--run-id", required=True, help="the MLflow run to evaluate")
    parser.add_argument("--n", type=int_at_least(2), default=None, help="generated samples (default: the run's eval.n)")
    parser.add_argument(
        "--metric",
        type=metric_list,
        default=None,
        metavar="M[,M...]",
        help=f"metrics to compute (default: the run's eval.metrics); valid: {', '.join(METRICS)}",
    )
    add_runtime_arguments(parser)
    add_weights_arguments(parser)
    return parser


def _run_and_config(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"unknown MLflow run id '{run_id}' in {client.tracking_uri}") from None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config_file = Path(client.download_artifacts(run_id, "config.yaml", tmp))
            import yaml

            cfg = ExperimentConfig.from_dict(yaml.safe_load(config_file.read_text()))
    except (MlflowException, OSError):
        raise ConfigError(f"run '{run_id}' has no config.yaml artifact; it was not made by study/run.py") from None
    return run, cfg


def _final_step(client, run_id: str, cfg: ExperimentConfig) -> int:
    history = client.get_metric_history(run_id, "eval/seconds")
    return max((m.step for m in history), default=cfg.train.images)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from liquid_diffusion import LiquidUNet
    from liquid_diffusion.codecs import load_codec
    from liquid_diffusion.data import open_source
    from liquid_diffusion.evaluate import Evaluator
    from liquid_diffusion.train import generate, resolve_device, resolve_precision

    check_tracking_uri(mlflow.get_tracking_uri())
    client = mlflow.MlflowClient()
    run, cfg = _run_and_config(client, args.run_id)
    metrics = args.metric or cfg.metrics
    weights = inception_weights_for([], args, metrics)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ema_dir = client.download_artifacts(args.run_id, "ema", tmp)
            model = LiquidUNet.from_pretrained(ema_dir)
        except (MlflowException, OSError):
            raise ConfigError(
                f"run '{args.run_id}' has no saved EMA weights (artifact ema/); only runs that finished "
                f"training save them (status {run.info.status})"
            ) from None
    model = model.to(device).eval()
    source = open_source(cfg.data)
    codec = load_codec(cfg.data.codec, cfg.data.codec_weights).to(device)
    evaluator = Evaluator(cfg, source, codec, weights, args.cache_dir, device, not args.no_progress, args.n, metrics)
    precision = resolve_precision(cfg.train.precision, device)

    start = time.perf_counter()
    prefix = f"eval_n{evaluator.n}/"
    scores = evaluator.evaluate(
        lambda noise: generate(model, codec, noise, cfg.train.sample_steps, precision, len(noise)),
        cfg.train.batch_size,
        prefix,
    )
    scores[f"{prefix}seconds"] = time.perf_counter() - start
    step, now = _final_step(client, args.run_id, cfg), int(time.time() * 1000)
    client.log_batch(args.run_id, metrics=[Metric(key, value, now, step) for key, value in scores.items()])
    client.set_tag(args.run_id, f"{prefix}reference_set", evaluator.reference_name)
    if weights is not None and run.data.tags.get("weights") != "unverified":
        client.set_tag(args.run_id, "weights", weights.tag)  # one unverified value marks the whole run
    for key, value in scores.items():
        print(f"{key} = {value:.6g}")
    print(f"logged into run {args.run_id} at step {step}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The exit code of `python study/eval.py ARGV`: main() with the command lines' error handling."""
    return run_command(lambda: main(argv), "eval.py", "nothing was logged")


if __name__ == "__main__":
    sys.exit(cli())
