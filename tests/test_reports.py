"""reports/build.py on synthetic MLflow stores with known numbers: CSV, HTML, PDF, a real browser, untidy data."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import BROWSER, assert_clean_error
from mlflow import MlflowClient
from pdf_layout import layout_problems, page_texts
from scipy import stats

from reports.synthetic import make_experiment

ARMS = {"baseline": [10.0, 12.0, 14.0], "no_relax": [13.0, 15.0, 17.5], "mix_3": [11.0]}


@pytest.fixture(scope="module")
def built(tmp_path_factory, repo):
    """One untidy synthetic experiment and its report."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    make_experiment(MlflowClient(uri), "synth", ARMS, untidy=True, grids=True)
    result = subprocess.run(
        [
            sys.executable,
            "reports/build.py",
            "--experiment",
            "synth",
            "--out",
            str(root / "out"),
            "--tracking-uri",
            uri,
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out", result


def test_summary_csv_has_the_exact_means_stds_deltas_and_scipy_s_welch_ci(built):
    out, _ = built
    summary = pd.read_csv(out / "summary.csv").set_index("arm")
    for arm, values in ARMS.items():
        assert summary.loc[arm, "mean"] == pytest.approx(np.mean(values))
        assert summary.loc[arm, "n_seeds"] == len(values)
    assert summary.loc["baseline", "std"] == pytest.approx(np.std(ARMS["baseline"], ddof=1))
    assert summary.loc["no_relax", "delta"] == pytest.approx(np.mean(ARMS["no_relax"]) - 12.0)
    assert summary.loc["no_relax", "delta_rel_pct"] == pytest.approx(100 * (np.mean(ARMS["no_relax"]) - 12) / 12)
    ci = stats.ttest_ind(ARMS["no_relax"], ARMS["baseline"], equal_var=False).confidence_interval(0.95)
    assert (summary.loc["no_relax", "welch_ci_low"], summary.loc["no_relax", "welch_ci_high"]) == pytest.approx(
        (ci.low, ci.high), rel=1e-9
    )
    paired = stats.ttest_rel(ARMS["no_relax"], ARMS["baseline"]).confidence_interval(0.95)
    assert (summary.loc["no_relax", "paired_ci_low"], summary.loc["no_relax", "paired_ci_high"]) == pytest.approx(
        (paired.low, paired.high), rel=1e-9
    )
    assert summary.loc["no_relax", "significant"] and summary.loc["no_relax", "values"] == "0:13 1:15 2:17.5"
    # one seed: a delta but no interval, and the reason
    assert summary.loc["mix_3", "delta"] == pytest.approx(-1.0) and np.isnan(summary.loc["mix_3", "welch_ci_low"])
    assert summary.loc["mix_3", "note"] == "one seed: no CI"
    # untidy: the pruned, over-budget and failed runs are counted, not averaged in
    assert summary.loc["no_relax", "n_pruned"] == 1 and summary.loc["no_relax", "n_failed"] == 1
    assert summary.loc["baseline", "n_over_budget"] == 1
    assert summary.loc["no_metric", "n_seeds"] == 0 and np.isnan(summary.loc["no_metric", "mean"])


def test_html_has_every_section_embeds_its_images_and_requests_nothing(built):
    out, _ = built
    page = (out / "report.html").read_text()
    for section in ("Protocol", "Findings", "Results: mnist", "Budget accounting", "Left out"):
        assert f"<h2>{section}</h2>" in page
    assert page.count("src='data:image/png;base64,") == 5  # forest, seed points, curves, t-bins, sample grids
    assert page.count("<figcaption>") == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert "1 RUNNING run(s) left out: baseline seed 90" in page
    assert (
        "no_relax (mnist): worse than baseline: fd_digits +3.17 (+26.4%) vs baseline (paired t 95% CI [+2.45, "
        "+3.88], Holm p = 0.0028), 3 seeds; P(improvement) = 0.11 [0.00, 0.44] (lower is better)."
    ) in page
    assert (
        "mix_3 (mnist): fd_digits -1 (-8.3%) vs baseline, 1 seed; no test (one seed: no CI): anecdotal (lower "
        "is better)."
    ) in page
    assert "digit-classifier feature space (not FID)" in page and "torch 2.14.1" in page


def test_pdf_reads_like_an_appendix_portrait_proportional_numbered_and_nothing_runs_off(built):
    from pypdf import PdfReader

    out, _ = built
    assert layout_problems(out / "report.pdf") == []  # portrait, text >= 6.5 pt inside the page, no ink at its edge
    texts = page_texts(out / "report.pdf")
    assert all(f"page {n}" in text for n, text in enumerate(texts, start=1))
    contents = texts[0][texts[0].index("Contents") :]
    for section in ("Protocol", "Findings", "Results: mnist", "Budget accounting", "Left out"):
        assert section in contents
    everything = "\n".join(texts)
    for text in ("baseline", "no_relax", "mix_3", "12 ± 2", "+3.17 (+26.4%) *", "[+2.45, +3.88]", "MDE"):
        assert text in everything, text
    # the captions are text, in full: a long title wraps instead of being clipped
    assert "each seed's final eval/fd_digits" in everything.replace("\r\n", " ").replace("\n", " ")
    fonts = {
        str(font.get_object()["/BaseFont"])
        for page in PdfReader(out / "report.pdf").pages
        for font in page["/Resources"]["/Font"].values()
    }
    assert "/Helvetica" in fonts and not any("Courier" in f for f in fonts), fonts


def test_the_layout_check_finds_a_clipped_title_on_a_landscape_page(tmp_path):
    """The old report's fault: a matplotlib page whose figure title ran off the paper."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(tmp_path / "old.pdf") as pdf:
        fig, ax = plt.subplots(figsize=(11.69, 8.27))
        fig.suptitle("mnist: samples from the same noise (EMA weights, lowest seed) " * 3)
        pdf.savefig(fig)
        plt.close(fig)
    problems = layout_problems(tmp_path / "old.pdf")
    assert any("landscape" in p for p in problems)
    assert any("characters outside the page" in p for p in problems)


def test_without_a_baseline_run_the_report_has_no_comparison_and_says_why(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_experiment(MlflowClient(uri), "quick", {"no_relax": [13.0, 15.0]})
    from reports.build import cli

    assert cli(["--experiment", "quick", "--out", str(tmp_path / "out"), "--tracking-uri", uri]) == 0
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert list(summary["arm"]) == ["no_relax"] and summary["delta"].isna().all()
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Δ vs" not in page and "paired 95% CI" not in page
    assert page.count("No comparison: the baseline arm &#x27;baseline&#x27; has no runs in this experiment yet") == 2
    assert "python study/run.py --ablation baseline" in page
    assert layout_problems(tmp_path / "out" / "report.pdf") == []


@pytest.mark.skipif(not BROWSER, reason="no headless Chromium: .ci/run installs Debian's chromium-headless-shell")
def test_the_html_renders_in_headless_chromium(built, tmp_path):
    out, _ = built
    url = (out / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    flags = [BROWSER, "--no-sandbox", "--disable-gpu", "--window-size=1280,2000"]
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # not blank: text, tables and plots drawn
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "<table>" in dom and "no_relax" in dom and "Budget accounting" in dom


@pytest.mark.parametrize(
    "args, expected",
    [
        pytest.param(["--experiment", "nope"], "unknown experiment 'nope'", id="unknown experiment"),
        pytest.param(["--experiment", "empty"], "has no trial runs", id="no trial runs"),
        pytest.param(
            ["--experiment", "small", "--baseline", "base"], "--baseline 'base' has no runs", id="unknown baseline"
        ),
        pytest.param(["--colour"], "unrecognized arguments", id="bad option"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, expected, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("empty")
    make_experiment(client, "small", {"baseline": [1.0]})
    from reports.build import cli  # in this process: the report's imports are paid once

    capsys.readouterr()
    code = cli([*args, "--out", str(tmp_path / "out"), "--tracking-uri", uri])
    result = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    assert_clean_error(result, expected)
    assert not (tmp_path / "out" / "report.html").exists()


def test_unverified_inception_weights_are_flagged_in_the_report(repo, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_experiment(
        MlflowClient(uri),
        "unverified",
        {"baseline": [30.0, 32.0], "no_relax": [31.0, 35.0]},
        dataset="afhq",
        objective="eval/fid_unverified",
        extra_tags={"weights": "unverified"},
    )
    result = subprocess.run(
        [
            sys.executable,
            "reports/build.py",
            "--experiment",
            "unverified",
            "--out",
            str(tmp_path / "out"),
            "--tracking-uri",
            uri,
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "afhq: objective eval/fid_unverified" in page and "Inception weights: UNVERIFIED" in page
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("arm")
    assert summary.loc["no_relax", "delta"] == pytest.approx(2.0)


def test_a_one_seed_report_labels_its_axes_with_plain_numbers(tmp_path, monkeypatch):
    """The report right after the quick start: one arm, one seed. matplotlib would label the per-seed axis
    with an offset ("1e-6+1.7003") and ticks 20.0 ... 22.0; the report's axes show plain numbers."""
    import reports.figures as figures
    from reports.build import cli

    drawn, finish = {}, figures.finish

    def keep(fig, caption):
        fig.canvas.draw()  # tick labels and the offset text are set when drawn
        drawn[caption] = [
            (ax.xaxis.get_major_formatter().get_offset(), [t.get_text() for t in ax.get_xticklabels()])
            for ax in fig.axes
        ]
        return finish(fig, caption)

    monkeypatch.setattr(figures, "finish", keep)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_experiment(MlflowClient(uri), "one", {"no_relax": [1.70030217]})  # the point shows 6 digits, the mean all
    assert cli(["--experiment", "one", "--out", str(tmp_path / "out"), "--tracking-uri", uri]) == 0
    [(offset, ticks)] = next(axes for caption, axes in drawn.items() if "each seed's final" in caption)
    assert offset == ""
    numbers = [float(t.replace("−", "-")) for t in ticks if t]
    assert all(1.5 < n < 1.9 for n in numbers) and len(numbers) >= 3
