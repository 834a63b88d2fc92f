"""How a trial ends, in one table that the tracker, the study driver and the report all read.

An outcome's kind is what the MLflow run's `status` tag and the Optuna trial's `status` attribute
say. A result (finished, pruned, over budget, non-finite loss) is final; an interruption or an
unexpected error is not, and rerunning the same command resumes that trial from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    kind: str
    run_status: str  # the MLflow run's status
    trial_state: str  # the name of the Optuna TrialState
    final: bool  # False: a rerun of the command resumes the trial
    counted_as: str  # the report's column: complete | pruned | over_budget | failed


OUTCOMES = {
    o.kind: o
    for o in (
        Outcome("finished", "FINISHED", "COMPLETE", True, "complete"),
        Outcome("pruned", "KILLED", "PRUNED", True, "pruned"),
        Outcome("over_budget", "FAILED", "FAIL", True, "over_budget"),
        Outcome("non_finite", "FAILED", "FAIL", True, "failed"),
        Outcome("interrupted", "KILLED", "FAIL", False, "failed"),
        Outcome("error", "FAILED", "FAIL", False, "failed"),
    )
}
