"""Optuna studies over ablation arms: one study per (arm, dataset, budget); any number of workers share them.

Seeds mode enqueues one trial per seed when a study is prepared, and workers claim queued trials
through the storage's compare-and-set on the trial state, so no seed is trained twice however many
workers run. Search mode asks TPE for new trials until N exist and prunes on the objective at each
evaluation. A trial interrupted by Ctrl-C, or failed by an unexpected error, is marked resumable;
the next run of the command queues it again and it resumes from its checkpoint. A trial of a worker
that died without a word is found by Optuna's heartbeat (RDB storages) and retried the same way.

Every study has a parent MLflow run (tag kind=study) with the summary of its trials; every trial
is a child run (kind=trial, mlflow.parentRunId) whose state mirrors the Optuna trial's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import statistics
import threading
import time
import warnings
from pathlib import Path

import mlflow
import optuna
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from optuna.trial import TrialState

from liquid_diffusion.config import ConfigError, ExperimentConfig
from liquid_diffusion.data import open_source
from liquid_diffusion.evaluate import objective_key
from liquid_diffusion.outcomes import OUTCOMES
from liquid_diffusion.train import Pruned

from .plans import StudyPlan
from .storage import has_heartbeat, redact, storage_of, trial_id_of
from .tracking import dataset_input, log_training_data, set_experiment, source_tags
from .trial import RuntimeOptions, run_dir_for, run_trial

POLL_SECONDS = 5  # how often an idle worker looks for work while others run
SEED_MAX = 2**31 - 1  # the seed's range in every study, so a rerun with more --seeds fits the same distribution
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def root_of(trial) -> int:
    """The number of the first attempt of a trial: retries (heartbeat) and resumes (rerun) share it."""
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.user_attrs.get("root_trial", trial.number if retried is None else retried)


class Book:
    """The trials of one study, classified; the attempts of one trial (a retry, a resume) count once.

    Duplicates that two commands queued at the same instant, once closed (user attr duplicate_of),
    are not trials of the study and are left out.
    """

    def __init__(self, study: optuna.Study):
        self.trials = [t for t in study.get_trials(deepcopy=False) if "duplicate_of" not in t.user_attrs]
        self.latest = {root_of(t): t for t in self.trials}  # per trial: its last attempt (trials are in order)

    def of_state(self, *states) -> list:
        return [t for t in self.trials if t.state in states]

    @staticmethod
    def unfinished(trial) -> bool:
        """A failed attempt whose work goes on from its checkpoint when the command is rerun.

        That is one marked resumable (interrupted, or an unexpected error), or one that carries no
        status of ours at all: its worker died without a word, and the heartbeat or a rerun on the
        same machine failed it. A result (over budget, non-finite loss) always carries a status.
        """
        return trial.state == TrialState.FAIL and (
            bool(trial.user_attrs.get("resumable")) or "status" not in trial.user_attrs
        )

    def to_requeue(self) -> list:
        """Unfinished trials with no later attempt: a rerun of the command queues them again.

        A seed that another trial already trains or finished is not queued again.
        """
        done = {self.seed_of(t) for t in self.final() + self.of_state(TrialState.RUNNING)} - {None}
        return [t for t in self.latest.values() if self.unfinished(t) and self.seed_of(t) not in done]

    def final(self) -> list:
        """The finished attempt of each trial that will not be tried again."""
        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return [t for t in self.latest.values() if t.state in done and not self.unfinished(t)]

    @staticmethod
    def seed_of(trial) -> int | None:
        """The trial's seed: a parameter once it runs, and a user attribute from the moment it is queued."""
        return trial.params.get("seed", trial.user_attrs.get("seed"))

    def owner_of_seed(self, seed: int):
        """The one trial that trains a seed: its finished trial if there is one, else the lowest-numbered
        queued or running one. Copies queued by commands that started at the same instant all agree on it,
        because Optuna creates trials under a lock on the study row: a lower number was committed first."""
        final = [t for t in self.final() if self.seed_of(t) == seed]
        live = [t for t in self.of_state(TrialState.WAITING, TrialState.RUNNING) if self.seed_of(t) == seed]
        return (final or sorted(live, key=lambda t: t.number) or [None])[0]


def local_worker_is_dead(trial) -> bool:
    """True if the trial's worker ran on this machine and its process is gone (SIGKILL, OOM killer, a
    closed notebook): a rerun can take the trial over at once instead of waiting out the heartbeat."""
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        pass
    return False


@contextlib.contextmanager
def heartbeat(storage, trial_id: int):
    """Optuna beats only inside study.optimize; this loop claims trials itself, so it beats here."""
    if not has_heartbeat(storage):
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Driver:
    def __init__(
        self,
        storage,
        storage_url: str,
        out: Path,
        runtime: RuntimeOptions,
        echo=print,
        worker_number: int = 0,
    ):
        self.storage, self.storage_url, self.out, self.runtime = storage, storage_url, out, runtime
        self.echo = echo
        self.client = mlflow.MlflowClient()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.worker_number = worker_number
        self.failures = 0
        self._studies: dict[str, optuna.Study] = {}
        self._sources: dict[str, object] = {}

    def source_for(self, cfg: ExperimentConfig):
        """The image source of cfg.data, opened once per process; DataError at once if it cannot be had."""
        key = json.dumps(cfg.data.to_dict(), sort_keys=True)
        if key not in self._sources:
            self._sources[key] = open_source(cfg.data)
        return self._sources[key]

    # --- studies and parent runs ---------------------------------------------------------------

    def study(self, plan: StudyPlan) -> optuna.Study:
        """The study, loaded once per process so its sampler keeps its state between trials."""
        if plan.name not in self._studies:
            self._studies[plan.name] = self._load(plan)
        return self._studies[plan.name]

    def _load(self, plan: StudyPlan) -> optuna.Study:
        if plan.search:  # each worker draws its own sequence, reproducible from --seed and the worker number
            sampler = optuna.samplers.TPESampler(seed=1000 * plan.search_seed + self.worker_number)
            pruner = plan.search.make_pruner()
        else:
            # Never consulted: every seeds-mode trial is queued with its seed. (GridSampler is not used
            # because once all grid points have started, it hands a running point to the next worker.)
            sampler = optuna.samplers.RandomSampler(seed=0)
            pruner = optuna.pruners.NopPruner()  # seeds of one config are never pruned against each other
        return optuna.create_study(
            study_name=plan.name,
            storage=self.storage,
            sampler=sampler,
            pruner=pruner,
            direction=plan.direction,
            load_if_exists=True,
        )

    def prepare(self, plan: StudyPlan) -> optuna.Study:
        """Create or continue the study, check it is the same config, queue its work, ensure its parent run."""
        study = self.study(plan)
        digest = study.user_attrs.get("config_digest")
        if digest is None:
            study.set_user_attr("config_digest", plan.digest)
        elif digest != plan.digest:
            raise ConfigError(
                f"study '{plan.name}' in {redact(self.storage_url)} was run with another config "
                f"(digest {digest}, now {plan.digest}); use another --experiment or --storage"
            )
        # Dead workers' trials: those whose heartbeat stopped (RDB storages), and at once those whose
        # process on this machine is gone (any storage, journal files included).
        optuna.storages.fail_stale_trials(study)
        for trial in Book(study).of_state(TrialState.RUNNING):
            if local_worker_is_dead(trial):
                study.tell(trial.number, state=TrialState.FAIL)
        # Rerunning the command resumes every unfinished trial, however often it was killed; the
        # heartbeat's own retries (RetryHeartbeatStaleTrialCallback) stay bounded within one command.
        for trial in Book(study).to_requeue():
            seed = {"seed": Book.seed_of(trial)} if plan.seeds is not None else {}
            study.enqueue_trial(trial.params, user_attrs={"root_trial": root_of(trial), **seed})
        for seed in plan.seeds or []:  # a seed with any attempt is skipped
            study.enqueue_trial({"seed": seed}, user_attrs={"seed": seed}, skip_if_exists=True)
        self.parent_run(plan, study)
        return study

    def parent_run(self, plan: StudyPlan, study: optuna.Study) -> str:
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    if run.info.status != "RUNNING" and not self.complete(plan, study):
                        self.client.update_run(run_id, status="RUNNING")
                    return run_id
            except MlflowException:
                pass  # another tracking store: make a parent there
        experiment = set_experiment(plan.experiment)
        mode = f"search over {plan.n_trials} trials" if plan.search else f"seeds {plan.seeds}"
        tags = {
            "kind": "study",
            "study": plan.name,
            "ablation": plan.arm.name,
            "dataset": plan.dataset,
            "budget": plan.budget,
            "optuna.study_name": plan.name,
            "optuna.storage": redact(self.storage_url),
            "study.mode": mode,
            "eval.objective_metric": plan.objective,
            MLFLOW_RUN_NOTE: plan.arm.description,
            **plan.arm.tags,
            **plan.tags,
            **source_tags(),
        }
        run = self.client.create_run(experiment.experiment_id, run_name=plan.name.split(":", 1)[1], tags=tags)
        params = {k: v for k, v in plan.base.flat().items() if k != "train.seed"}
        self.client.log_batch(
            run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        )
        self.client.log_dict(run.info.run_id, plan.base.to_dict(), "config.yaml")
        log_training_data(run.info.run_id, dataset_input(self.source_for(plan.base), plan.base.data))
        study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
        winner = study.user_attrs.get("mlflow_parent_run_id")  # two fresh commands may race here
        if winner != run.info.run_id:
            self.client.delete_run(run.info.run_id)
        return winner

    def complete(self, plan: StudyPlan, study: optuna.Study, book: Book | None = None) -> bool:
        book = book or Book(study)
        if book.of_state(TrialState.RUNNING):
            return False
        if plan.seeds is not None:  # a duplicate left queued by two racing commands does not count
            return set(plan.seeds) <= {Book.seed_of(t) for t in book.final()}
        return len(book.final()) >= plan.n_trials and not book.of_state(TrialState.WAITING)

    def summarize(self, plan: StudyPlan, study: optuna.Study) -> dict[str, float]:
        """Log the study's summary metrics to its parent run; end the parent when the study is complete."""
        book = Book(study)
        final = book.final()
        values = [t.value for t in final if t.state == TrialState.COMPLETE and t.value is not None]
        unfinished = len(book.to_requeue())  # failed for now; a rerun resumes them
        summary = {
            "study/n_complete": len(values),
            "study/n_pruned": sum(t.state == TrialState.PRUNED for t in final),
            "study/n_failed": sum(t.state == TrialState.FAIL for t in final) + unfinished,
            "study/n_resumable": unfinished,
            "study/n_over_budget": sum(t.user_attrs.get("status") == "over_budget" for t in final),
        }
        if values:
            best = max(values) if plan.direction == "maximize" else min(values)
            summary.update(
                {
                    "study/best": best,
                    "study/mean": statistics.fmean(values),
                    "study/std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
            )
        parent = study.user_attrs["mlflow_parent_run_id"]
        now = int(time.time() * 1000)
        self.client.log_batch(parent, metrics=[Metric(k, v, now, len(final)) for k, v in summary.items()])
        if self.complete(plan, study, book):
            self.client.set_terminated(parent, "FINISHED")
        return summary

    # --- workers -------------------------------------------------------------------------------

    def claim(self, plan: StudyPlan, study: optuna.Study) -> optuna.Trial | None:
        """A queued trial, taken atomically; in search mode a new TPE trial while fewer than N exist.

        study.ask() would create a fresh trial when the queue is empty, so a worker that lost the
        race for the last queued seed would start a trial without one. Claiming through the
        storage's compare-and-set on the state (what ask() does inside) cannot.
        """
        storage = storage_of(study)
        for queued in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if plan.seeds is not None and Book.seed_of(queued) not in plan.seeds:
                continue  # queued by an earlier command with other seeds: `--seed 1` trains seed 1 only
            try:
                if not storage.set_trial_state_values(trial_id_of(queued), state=TrialState.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            trial = optuna.Trial(study, trial_id_of(queued))
            trial.set_user_attr("worker", self.worker)  # first, so a rerun can tell whether this process died
            seed = Book.seed_of(queued)
            # Two commands that start at the same instant each queue every seed. Read the study again,
            # after this claim: only the seed's lowest-numbered copy trains, and a worker holding a higher
            # copy always sees the lower one, however the claims interleave.
            owner = Book(study).owner_of_seed(seed) if plan.seeds is not None else None
            if owner is not None and owner.number != queued.number:
                trial.set_user_attr("duplicate_of", seed)  # closed, so nothing is left waiting; Book leaves it out
                study.tell(trial, state=TrialState.FAIL)
                continue
            return trial
        book = Book(study)
        if plan.search:
            attempts = len(book.final()) + len(book.of_state(TrialState.RUNNING)) + len(book.to_requeue())
            if attempts < plan.n_trials:
                trial = study.ask()
                trial.set_user_attr("worker", self.worker)
                return trial
        return None

    def work(self, plans: list[StudyPlan]) -> None:
        """Claim and run trials until every study is complete or nothing is left for this worker."""
        waited = False
        while True:
            for plan in plans:
                study = self.study(plan)
                optuna.storages.fail_stale_trials(study)  # heartbeat: a dead worker's trial is retried
                trial = self.claim(plan, study)
                if trial is not None:
                    self.execute(plan, study, trial)
                    self.summarize(plan, study)
                    waited = False
                    break
            else:
                running = sum(len(Book(self.study(p)).of_state(TrialState.RUNNING)) for p in plans)
                if not running:
                    return
                if not has_heartbeat(self.storage):
                    self.echo(
                        f"{running} trial(s) still running in other workers; this worker is done "
                        f"(journal storage has no heartbeat to detect a dead worker)"
                    )
                    return
                interval = self.storage.get_heartbeat_interval()
                if not waited:
                    self.echo(
                        f"waiting for {running} trial(s) running in other workers; a dead worker's trial is "
                        f"retried here after {2 * interval} s without a heartbeat"
                    )
                    waited = True
                time.sleep(min(POLL_SECONDS, interval))

    def execute(self, plan: StudyPlan, study: optuna.Study, trial: optuna.Trial) -> None:
        seed = trial.suggest_int("seed", 0, SEED_MAX) if plan.seeds is not None else plan.search_seed
        overrides = plan.search.suggest(trial) if plan.search else {}
        cfg = plan.config_for(seed, overrides)
        objective = objective_key(cfg, self.runtime.weights)
        label = f"{plan.arm.name} seed {seed}" + (f" trial {trial.number} {overrides}" if plan.search else "")
        root = root_of(storage_of(study).get_trial(trial_id_of(trial)))  # the first attempt: retries share it
        tags = {
            "kind": "trial",
            "ablation": plan.arm.name,
            "dataset": plan.dataset,
            "seed": str(seed),
            "budget": plan.budget,
            "study": plan.name,
            "optuna.study_name": plan.name,
            "optuna.trial_number": str(trial.number),
            "optuna.root_trial": str(root),  # a retry on another machine finds the earlier attempt's run by it
            MLFLOW_RUN_NOTE: plan.arm.description,  # the run's description in the UI
            **plan.arm.tags,  # a factorial's factor.<name> levels
            **plan.tags,  # the study's decision settings
            **source_tags(),
        }
        # A search trial gets its own folder even when TPE repeats parameters; its retries and resumes share it.
        suffix = f"-trial{root}" if plan.search else ""
        run_dir = run_dir_for(self.out, plan.experiment, plan.arm.name, cfg, plan.budget, suffix)
        self.echo(f"== {label}: {plan.arm.description}\n   run folder: {run_dir}")

        def report(metrics: dict[str, float], step: int) -> None:
            if plan.search and objective in metrics:
                trial.report(metrics[objective], step)
                if trial.should_prune():
                    raise Pruned(f"pruned at {step} images: {objective} = {metrics[objective]:.6g}")

        state, value = TrialState.FAIL, None
        try:
            with heartbeat(storage_of(study), trial_id_of(trial)):
                outcome = run_trial(
                    cfg,
                    tags,
                    run_dir,
                    plan.experiment,
                    self.runtime,
                    study.user_attrs["mlflow_parent_run_id"],
                    report,
                    self.source_for(cfg),
                    self.earlier_attempt_run(plan, trial.number, root) if self.runtime.upload_checkpoints else None,
                )
        except KeyboardInterrupt:
            trial.set_user_attr("resumable", True)
            trial.set_user_attr("reason", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except ConfigError:  # bad input stops the command; the trial runs again once it is fixed
            trial.set_user_attr("resumable", True)
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as err:  # a failed trial is recorded and the study goes on
            trial.set_user_attr("resumable", True)
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
            study.tell(trial, state=TrialState.FAIL)
            self.failures += 1
            self.echo(f"   FAILED with an error ({type(err).__name__}: {err}); rerun the command to retry it")
            return
        trial.set_user_attr("mlflow_run_id", outcome.run_id)
        trial.set_user_attr("status", outcome.kind)
        if outcome.result is not None:
            trial.set_user_attr("resumed_from", outcome.result.resumed_from)
        state = TrialState[OUTCOMES[outcome.kind].trial_state]
        if state == TrialState.COMPLETE:  # finished; without a finite objective it is no result
            value = self.client.get_run(outcome.run_id).data.metrics.get(objective)
            state = TrialState.COMPLETE if value is not None and math.isfinite(value) else TrialState.FAIL
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        self.client.set_tag(outcome.run_id, "optuna.state", state.name)
        self.failures += state == TrialState.FAIL
        self.report_outcome(outcome, state, objective, value)

    def earlier_attempt_run(self, plan: StudyPlan, number: int, root: int) -> str | None:
        """The MLflow run of the latest earlier attempt of trial `number` (first attempt `root`), on whichever
        machine it ran, or None."""
        experiment = self.client.get_experiment_by_name(plan.experiment)
        query = (
            f"tags.kind = 'trial' AND tags.study = '{plan.name}' AND tags.`optuna.root_trial` = '{root}' "
            f"AND tags.`optuna.trial_number` != '{number}'"
        )
        runs = self.client.search_runs(
            [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None

    def close(self, plan: StudyPlan, study: optuna.Study) -> None:
        """At the end of a command: a study left unfinished with nothing running or queued has a FAILED
        parent run (a rerun of the command sets it RUNNING again and resumes the work)."""
        book = Book(study)
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if (
            parent
            and not self.complete(plan, study, book)
            and not book.of_state(TrialState.RUNNING, TrialState.WAITING)
        ):
            self.client.set_terminated(parent, "FAILED")

    def interrupted(self, plans: list[StudyPlan]) -> None:
        """Mark the parent run of each unfinished study that no other worker is running as KILLED."""
        for plan in plans:
            study = self.study(plan)
            parent = study.user_attrs.get("mlflow_parent_run_id")
            if parent and not Book(study).of_state(TrialState.RUNNING) and not self.complete(plan, study):
                self.client.set_terminated(parent, "KILLED")

    def report_outcome(self, outcome, state, objective_key: str, value) -> None:
        self.echo(
            f"   {state.name}: MLflow run {outcome.run_id}"
            + (f" ({outcome.reason})" if outcome.reason else "")
            + (f"; {objective_key} = {value:.6g}" if value is not None else "")
        )
        if outcome.result is not None:
            r, s = outcome.result, outcome.result.seconds
            self.echo(
                f"   {r.images_seen} images in {r.steps} steps, final loss {r.final_loss:.4f}"
                + (f", resumed at {r.resumed_from} images" if r.resumed_from else "")
            )
            self.echo(
                f"   wall time: step {s['step']:.1f}s, eval {s['eval']:.1f}s, data {s['data']:.2f}s, logging "
                f"{s['logging']:.2f}s, checkpoints {s['checkpoint']:.2f}s; harness overhead "
                f"{100 * r.overhead_fraction:.2f}% of training time (eval excluded)"
            )
