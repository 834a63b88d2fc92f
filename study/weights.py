"""The command-line options for the Inception weights, shared by study/run.py and study/eval.py."""

from __future__ import annotations

import argparse

from liquid_diffusion.config import INCEPTION_METRICS, ExperimentConfig


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        default=None,
        help="the standard torch-fidelity Inception file (weights-inception-2015-12-05-6726825d.pth), "
        "for FID/KID/precision/recall offline (default: $LIQUID_DIFFUSION_INCEPTION_WEIGHTS, "
        "then torch.hub's cache, then a download)",
    )
    parser.add_argument(
        "--allow-unverified-weights",
        action="store_true",
        help="accept an Inception file whose SHA-256 differs; its values are logged as "
        "eval/*_unverified and tagged weights=unverified, never as FID",
    )


def inception_weights_for(configs: list[ExperimentConfig], args, metrics: tuple[str, ...] = ()):
    """Checked weights when any config (or `metrics`) needs Inception, else None; WeightsError otherwise."""
    needed = set(metrics) | {m for cfg in configs for m in cfg.metrics}
    if not needed & set(INCEPTION_METRICS):
        return None
    from liquid_diffusion.inception import resolve_inception_weights

    return resolve_inception_weights(args.inception_weights, args.allow_unverified_weights)
