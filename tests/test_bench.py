"""study/bench.py --quick runs and prints its table and ratios; no ratio is asserted (machines are noisy)."""

import subprocess
import sys


def test_quick_benchmark_prints_the_table_and_ratios(repo):
    result = subprocess.run(
        [sys.executable, "study/bench.py", "--quick"], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("liquid-micro-baseline", "liquid-micro-plain_conv", "reference-micro", "unet2d-attn", "unet2d-noattn"):
        assert name in result.stdout
    assert "train  vs reference-micro" in result.stdout and "sample vs unet2d-attn" in result.stdout
    # fp32 against bf16 autocast, with the ratio to fp32
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("micro ")]
    assert [row[2] for row in rows] == ["fp32", "bf16"]
    assert rows[0][4] == "1.00x" and float(rows[1][3]) > 0 and rows[1][4].endswith("x")


def test_fewer_than_five_repetitions_is_refused(repo):
    result = subprocess.run(
        [sys.executable, "study/bench.py", "--reps", "3"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "--reps must be >= 5" in result.stderr
