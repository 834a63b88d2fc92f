"""study/run.py as a user runs it: a subprocess, checked for exit code, stdout and stderr."""

import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import assert_clean_error, run_study

from liquid_diffusion import ConfigError, ExperimentConfig
from study.arms import load_arms, select_arms

REQUIRED_ARMS = {
    "baseline",
    "no_relax",
    "relax_t",
    "plain_conv",
    "no_gate",
    "minimal_gate",
    "time_free_gate",
    "mix_3",
    "mix_3_5",
    "no_global_pool",
    "no_adaln",
}


def test_list_prints_every_arm_with_its_description(repo):
    result = run_study(None, "--list")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(listed) >= REQUIRED_ARMS and len(listed) >= 11
    for name, arm in load_arms().items():
        assert arm.description in listed[name]


def test_dry_run_prints_resolved_configs_as_yaml(repo):
    result = run_study(None, "--ablation", "no_relax,mix_3", "--dry-run")
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["model"]["relax"] for d in docs] == ["none", "temb"]
    assert docs[1]["model"]["kernels"] == [3]
    assert ExperimentConfig.from_dict(docs[0]).model.relax == "none"


def test_unknown_arm_exits_2_with_one_line_listing_the_arms(repo):
    assert_clean_error(run_study(None, "--ablation", "no_relx", "--dry-run"), "no_relx", "no_relax", "baseline")


def test_unknown_flag_exits_2_with_one_line(repo):
    assert_clean_error(run_study(None, "--ablaton", "x"), "--ablaton")


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            "description: typo\noverrides:\n  model.relx: none\n",
            ["bad.yaml", "model.relx", "did you mean 'model.relax'"],
        ),
        ("description: bad value\noverrides:\n  model.mixer: transformer\n", ["bad.yaml", "mixer", "cfc, conv"]),
        ("description: [unclosed\n", ["bad.yaml", "not valid YAML"]),
        ("descripton: typo\noverrides: {}\n", ["bad.yaml", "descripton", "description, overrides"]),
    ],
    ids=["unknown-key", "bad-value", "malformed", "unknown-top-level-key"],
)
def test_broken_ablation_file_exits_2_naming_file_key_and_choices(repo, tmp_path, text, fragments):
    arms_dir = tmp_path / "ablations"
    shutil.copytree(repo / "ablations", arms_dir)
    (arms_dir / "bad.yaml").write_text(text)
    assert_clean_error(run_study(None, "--ablations-dir", str(arms_dir), "--list"), *fragments)


def test_select_arms_expands_all_and_keeps_order():
    arms = load_arms()
    assert [a.name for a in select_arms(arms, "all")] == list(arms)
    assert [a.name for a in select_arms(arms, "mix_3, no_relax,mix_3")] == ["mix_3", "no_relax"]
    with pytest.raises(ConfigError, match="valid arms"):
        select_arms(arms, ",")


def test_baseline_has_no_overrides():
    assert load_arms()["baseline"].overrides == {}


def test_a_reader_that_stops_early_gets_no_traceback(repo):
    """`run.py --ablation all --dry-run | head -1`: the pipe closes while run.py still writes."""
    command = f"{sys.executable} study/run.py --ablation all --dry-run | head -1"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.stdout.startswith("# study: liquid-diffusion:baseline:mnist:cpu-demo")
    assert result.stderr == "", result.stderr
