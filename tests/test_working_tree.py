"""A command run against a store elsewhere writes nothing into the folder it starts in (issue 28)."""

from helpers import study_env


def test_a_store_elsewhere_keeps_its_artifacts_beside_it_not_in_the_current_folder(tmp_path, monkeypatch, run_here):
    store, fresh = tmp_path / "store", tmp_path / "fresh"
    store.mkdir()
    fresh.mkdir()
    monkeypatch.chdir(fresh)  # as a user's folder, or the repository under pytest
    result = run_here(study_env(store), "--ablation", "no_relax", "--budget", "cpu-smoke", "--out", str(store / "out"))
    assert result.returncode == 0, result.stderr
    assert list(fresh.iterdir()) == []  # before the fix: fresh/mlruns/1/<run>/artifacts
    assert any((store / "mlruns").rglob("config.yaml"))  # the run's artifacts, beside its database
