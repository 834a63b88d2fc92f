"""The benchmarks run and print tables that parse; no speed ratio is asserted (machines are noisy)."""

import re

import pytest
from helpers import run_script

MICRO_PARAMS = 3_457_284  # the micro preset, as the README states it (tests/test_config.py checks it exactly)


@pytest.mark.slow  # about 35 s of timing five models: run by CI after the fast suite
def test_quick_benchmark_prints_a_table_of_every_model_and_the_ratios():
    result = run_script("study/bench.py", None, "--quick", "--sample-steps", "2", "--profile")
    assert result.returncode == 0, result.stderr[-3000:]
    # model -> (params in millions, train img/s, sample img/s, GFLOP/step, GFLOP/s, % of peak,
    #           sampling GFLOP/s, % of peak)
    table = {}
    row = r"(\S+)\s+([\d.]+)M\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%\s+([\d.]+)\s+(\d+)%"
    for line in result.stdout.splitlines():
        if match := re.fullmatch(row, line.strip()):
            table[match[1]] = tuple(float(x) for x in match.groups()[1:])
    names = ["liquid-micro-baseline", "liquid-micro-plain_conv", "reference-micro", "unet2d-attn", "unet2d-noattn"]
    assert sorted(table) == sorted(names)
    assert all(train > 0 and sample > 0 for _, train, sample, *_ in table.values())
    # FLOP per step (depthwise backward counted as twice its forward) and the share of the fp32 matmul peak
    assert re.search(r"fp32 matmul peak here: \d+ GFLOP/s", result.stdout)
    baseline = table["liquid-micro-baseline"]
    assert baseline[3] == pytest.approx(1.64, rel=0.02)  # GFLOP of one step at batch 4, 4x16x16
    assert 0 < baseline[5] <= 100 and baseline[4] == pytest.approx(baseline[3] * baseline[1] / 4, rel=0.05)
    assert baseline[6] > 0 and 0 < baseline[7] <= 100  # sampling against the same peak
    assert table["liquid-micro-baseline"][0] == pytest.approx(MICRO_PARAMS / 1e6, abs=0.005)
    assert table["reference-micro"][0] == table["liquid-micro-baseline"][0]  # the same network, written directly
    for name in names[1:]:  # the comparisons are parameter-matched within 10%
        assert table[name][0] == pytest.approx(MICRO_PARAMS / 1e6, rel=0.10), name
    ratios = re.findall(r"(train|sample)\s+vs (\S+)\s+([\d.]+)x", result.stdout)
    assert {(kind, other) for kind, other, _ in ratios} == {
        (kind, other) for kind in ("train", "sample") for other in ("reference-micro", "unet2d-attn", "unet2d-noattn")
    }
    # fp32 against bf16 autocast, with the ratio to fp32
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("micro ")]
    assert [row[2] for row in rows] == ["fp32", "bf16"]
    assert rows[0][4] == "1.00x" and float(rows[1][3]) > 0 and rows[1][4].endswith("x")
    assert all(row[-1].endswith("%") for row in rows) and rows[0][7] == rows[1][7]  # same FLOP in bf16
    # --profile: where the demo's step goes, by kind of op, and the bound if only matmuls and convolutions took time
    breakdown = result.stdout.split("where a micro training step goes", 1)[1]
    kinds = dict(re.findall(r"^(matmul|convolution|GroupNorm|AdamW \(fused\)|outside ops)\s+([\d.]+)", breakdown, re.M))
    assert set(kinds) == {"matmul", "convolution", "GroupNorm", "AdamW (fused)", "outside ops"}
    matmul = re.search(r"^matmul\s+[\d.]+\s+\d+%\s+([\d.]+)", breakdown, re.M)
    assert float(matmul[1]) > 0.5 * float(rows[0][7])  # matmuls are most of the demo step's FLOPs
    assert re.search(r"with every other op free it would be \d+%", breakdown)


def test_fewer_than_five_repetitions_is_refused(capsys):
    from study.bench import main

    with pytest.raises(SystemExit) as exit:
        main(["--reps", "3"])
    assert exit.value.code == 2 and "--reps must be >= 5" in capsys.readouterr().err


@pytest.mark.slow  # about 30 s: a 20-run store generated, the report built from it, then through mlflow server
def test_report_benchmark_builds_a_generated_store_directly_and_through_a_server():
    result = run_script("reports/bench.py", None, "--runs", "20", "--server")
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"store of (\d+) runs .* report built in ([\d.]+) s \((\d+) PDF pages\)", result.stdout)
    assert match, result.stdout
    assert int(match[1]) == 20 and float(match[2]) > 0 and int(match[3]) >= 1
    assert re.search(r"through mlflow server: report built in [\d.]+ s .* summary.csv identical", result.stdout)
