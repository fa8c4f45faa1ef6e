"""Experiment tracking of trials, both optional: TensorBoard event files (`hpo.run --tensorboard DIR`)
and MLflow runs (`hpo.run --mlflow URI`).

A trial opens its trackers once its config is known, hands them every epoch's figures (also the
epochs a resumed trial inherits from its checkpoint, so that each run shows the whole curve), its
artifacts when it completes, and closes them whatever its outcome. Tracking serves the person
watching; it never decides a trial: a tracker that fails is reported in the worker's log and
dropped for the rest of that trial, and the trial goes on.

Nothing here imports tensorboard, mlflow or torch at module level: the dispatcher imports this
module (check_available), and a search without the flags must not need the packages.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hpo.protocol import INTERRUPTED, Attr
from maskcls.errors import QUOTE_LIMIT, UserError, mask_secrets
from maskcls.labels import NUM_CLASSES, class_name

if TYPE_CHECKING:
    from maskcls.train import EpochMetrics

log = logging.getLogger(__name__)

INSTALL = {"tensorboard": "pip install -e '.[tensorboard]'", "mlflow": "pip install -e '.[mlflow]'"}
# Optuna's final trial states -> MLflow run statuses; an interrupted trial (queued again) was KILLED.
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
PROBE_TIMEOUT_S = 10
ROLE = "optuna.role"  # "study" on the parent run; trial runs carry optuna.trial_number
BEST = "optuna.best"  # "true" on the run of the study's best trial so far, "false" on those it replaced


def check_available(tensorboard: str | None, mlflow: str | None, study: str | None = None) -> None:
    """Called once by the dispatcher before any trial: a missing package, a folder TensorBoard
    cannot write or an MLflow store that refuses to open would otherwise only be warned about in
    every trial of every worker's log. With `study`, the MLflow experiment is also created here,
    so that workers starting together do not race to create it."""
    for package, wanted in (("tensorboard", tensorboard), ("mlflow", mlflow)):
        if wanted is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(f"--{package} needs the {package} package: {INSTALL[package]}") from None
    if tensorboard is not None:
        Path(tensorboard).mkdir(parents=True, exist_ok=True)  # an OSError here names the folder
    if mlflow is not None:
        _check_mlflow(mlflow, study)


@contextlib.contextmanager
def _answer_soon() -> Iterator[None]:
    """A tracking server that does not answer is an error within seconds, not after MLflow's seven
    retries of two minutes each (the probe only; trials keep MLflow's patience)."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
    before = {key: os.environ.get(key) for key in quick}
    os.environ.update({key: os.environ.get(key) or value for key, value in quick.items()})
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_mlflow(uri: str, study: str | None) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # its INFO lines (creating tables...) stay off the console
        logging.getLogger(name).setLevel(logging.WARNING)
    shown = mask_secrets(uri)
    _open_database(uri, shown)
    try:
        with _answer_soon():
            _open_experiment(MlflowClient(tracking_uri=uri), uri, shown, study)
    except MlflowException as err:
        if "MLFLOW_ALLOW_FILE_STORE" in str(err):  # MLflow 3.x refuses its file store by default
            raise UserError(
                f"this MLflow refuses the local file store {shown}: use --mlflow sqlite:///mlflow.db, "
                "or set MLFLOW_ALLOW_FILE_STORE=true to keep the file store"
            ) from None
        raise UserError(f"cannot use MLflow at {shown}: {_first_line(err)}") from None
    except UserError:
        raise
    except Exception as err:  # a driver or a URL MLflow did not wrap (a missing database, mysql://)
        raise UserError(f"cannot use MLflow at {shown}: {_first_line(err)}") from None


def _open_database(uri: str, shown: str) -> None:
    """A database store that does not open is one line at once: MLflow itself tries ten times
    over about 100 s, with a warning each time."""
    scheme = uri.split(":", 1)[0].split("+")[0]
    if scheme not in ("sqlite", "postgresql", "mysql", "mssql"):
        return
    import sqlalchemy

    try:
        if scheme == "sqlite" and not uri.startswith("sqlite:///:memory:"):  # MLflow makes the folder too
            Path(uri.removeprefix("sqlite:///").split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlalchemy.create_engine(uri)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:  # a driver that is missing (mysql://), a database that is not there
        raise UserError(f"cannot use MLflow at {shown}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return mask_secrets(text.splitlines()[0] if text else type(err).__name__)[:QUOTE_LIMIT]


def _open_experiment(client: Any, uri: str, shown: str, study: str | None) -> None:
    """The tracking store answers, and the study's experiment exists (created here, once)."""
    if study is None:
        client.search_experiments(max_results=1)
        return
    found = client.get_experiment_by_name(study)
    if found is not None and found.lifecycle_stage == "deleted":
        raise UserError(
            f"the MLflow experiment {study!r} at {shown} is deleted: restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or delete it for good "
            "(mlflow gc)"
        )
    study_run(client, uri, study, running=True)


def study_run(client: Any, uri: str, study: str, running: bool = False) -> str:
    """The id of the study's parent run (tag optuna.role=study, named study-<name>), under which
    every trial's run nests, created by the first process to ask (the dispatcher, before any
    worker). Should two machines create one at once, every process takes the oldest. `running`:
    mark it RUNNING again (a study run on)."""
    experiment = experiment_id(client, uri, study)

    def oldest() -> str | None:
        found = client.search_runs(
            [experiment], filter_string=f"tags.`{ROLE}` = 'study'", order_by=["attributes.start_time ASC"]
        )
        return str(found[0].info.run_id) if found else None

    run_id = oldest()
    if run_id is None:
        with _file_store_lock(uri):
            run_id = oldest() or str(
                client.create_run(
                    experiment, tags={ROLE: "study", "optuna.study": study}, run_name=f"study-{study}"
                ).info.run_id
            )
    if running:
        client.update_run(run_id, status="RUNNING")
    return run_id


def end_study_run(uri: str, study: str, best: tuple[int, float] | None) -> None:
    """The dispatcher saw the study reach its trial count: its parent run is FINISHED, and its best
    tags name `best` (trial number, validation macro-F1) as the study has it, whatever order
    workers finishing together wrote them in."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = study_run(client, uri, study)
    if best is not None:
        number, value = best
        runs = client.search_runs(
            [experiment_id(client, uri, study)], filter_string=f"tags.`{BEST}` = 'true'"
        )
        mine = client.search_runs(
            [experiment_id(client, uri, study)], filter_string=f"tags.`optuna.trial_number` = '{number}'"
        )
        for run in runs:
            if not mine or run.info.run_id != mine[0].info.run_id:
                client.set_tag(run.info.run_id, BEST, "false")
        if mine:
            _tag_best(client, parent, number, value, mine[0].info.run_id)
    client.set_terminated(parent, "FINISHED")


def _tag_best(client: Any, parent: str, number: int, value: float, run_id: str) -> None:
    for key, tag in (("best_trial", number), ("best_value", value), ("best_run_id", run_id)):
        client.set_tag(parent, key, str(tag))
    client.set_tag(run_id, BEST, "true")


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The experiment named after the study, created by the first process to ask."""
    found = client.get_experiment_by_name(name)  # the first call also sets a new file store up
    if found is None:
        with _file_store_lock(uri):
            found = client.get_experiment_by_name(name) or _create_experiment(client, uri, name)
    return str(found.experiment_id)


def _create_experiment(client: Any, uri: str, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_experiment(
            client.create_experiment(name, artifact_location=artifact_location(uri, name))
        )
    except MlflowException:  # a database refuses a second experiment of a name: another was first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found


def _file_store_lock(uri: str) -> contextlib.AbstractContextManager[Any]:
    """MLflow's file store checks that a name is free, then creates the experiment: workers asking
    at once would each create one, and split the study's runs between them. They take turns."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return contextlib.nullcontext()
    from filelock import FileLock

    root = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme else Path(uri)
    return FileLock(str(root / ".hpo-experiments.lock"))


def artifact_location(uri: str, study: str) -> str | None:
    """Beside an SQLite database: MLflow would otherwise put its artifacts in ./mlruns of whichever
    folder the first process happened to start in. Other stores (a server, the file store) know
    where their artifacts go."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    database = Path(uri.removeprefix("sqlite:///").split("?")[0])
    return (database.resolve().parent / "mlartifacts" / study).as_uri()


@dataclass(frozen=True)
class TrialInfo:
    """What a tracker records about a trial besides its epochs."""

    study: str
    number: int
    params: Mapping[str, Any]  # as Optuna suggested them
    config: Mapping[str, Mapping[str, Any]]  # the resolved TrainConfig, group -> key -> value
    tags: Mapping[str, str] = field(default_factory=dict)  # worker, host, device, retried_from

    @property
    def name(self) -> str:
        return f"trial-{self.number}"


def scalars(metrics: EpochMetrics) -> dict[str, float]:
    """One epoch's figures, named by group (train/, val/, val_f1/<class>) so that both tools
    show them in sections; the validation ones only when measured."""
    values: dict[str, float | None] = {
        "train/loss": metrics.train_loss,
        "train/lr": metrics.lr,
        "train/images_per_s": metrics.images_per_s,
        "val/loss": metrics.val_loss,
        "val/macro_f1": metrics.val_macro_f1,
        "val/accuracy": metrics.val_accuracy,
    }
    for attribute, accuracy in (metrics.val_attribute_accuracy or {}).items():
        values[f"val/{attribute}_accuracy"] = accuracy
    if metrics.val_per_class_f1 is not None:  # scored in the competition's classes
        names = [class_name(c) for c in range(NUM_CLASSES)]
        for name, f1 in zip(names, metrics.val_per_class_f1, strict=True):
            values[f"val_f1/{name}"] = f1
    return {key: float(value) for key, value in values.items() if value is not None}


class Tracker(Protocol):
    """One tool's record of one trial; hpo.objective reaches it only through Trackers."""

    def epoch(self, metrics: EpochMetrics) -> None: ...

    def files(self, paths: Sequence[Path]) -> None: ...

    def finish(self, state: str, reason: str | None) -> None: ...


class TensorBoardTracker:
    """One event-file folder per trial, DIR/<study>/trial-<n>; the params as text, and as hparams
    at the end (with the trial's state) so that TensorBoard's HParams tab compares the trials."""

    def __init__(self, folder: str | Path, trial: TrialInfo):
        from torch.utils.tensorboard import SummaryWriter

        self.trial = trial
        self.writer = SummaryWriter(log_dir=str(Path(folder) / trial.study / trial.name))
        rows = "\n".join(f"| {key} | {value} |" for key, value in trial.params.items())
        self.writer.add_text("params", f"| param | value |\n|---|---|\n{rows}")

    def epoch(self, metrics: EpochMetrics) -> None:
        for tag, value in scalars(metrics).items():
            self.writer.add_scalar(tag, value, metrics.epoch)
        self.writer.flush()  # a trial's curves are watched while it trains

    def files(self, paths: Sequence[Path]) -> None:
        """The artifacts stay with Optuna's store and MLflow; TensorBoard shows scalars."""

    def finish(self, state: str, reason: str | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("state", f"{state}: {reason}" if reason else state)
        kept = (int, float, str, bool)
        params = {k: v if isinstance(v, kept) else str(v) for k, v in self.trial.params.items()}
        # Only the metric's name is used: the HParams tab reads its values from the trial's scalars.
        for summary in hparams({**params, "state": state}, {"val/macro_f1": 0.0}):
            self.writer._get_file_writer().add_summary(summary)  # add_hparams would open another folder
        self.writer.close()


def mlflow_key(name: str) -> str:
    """MLflow names allow letters, digits and _-./: and space; the class names' age bands do not."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("<", "under").replace("+", "plus"))


class MlflowTracker:
    """One MLflow run per trial, named trial-<n>, nested under the study's parent run in the
    experiment named after the study: the params (the suggested ones and the rest of the config,
    dotted), metrics with step=epoch, the artifacts of a complete or pruned trial, and a status that
    follows the trial's state. A complete trial that beats the study's best so far (by validation
    macro-F1, as the parent's best_value tag has it) moves the parent's best_trial, best_value and
    best_run_id tags to itself and the optuna.best tag from the previous best run to its own. Only
    the client API: no process-wide active run, as one worker runs many trials."""

    def __init__(self, uri: str, trial: TrialInfo):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.parent = study_run(self.client, uri, trial.study)
        self.number = trial.number
        self.best_f1: float | None = None  # the best epoch so far: the trial's value
        tags = {
            "optuna.study": trial.study,
            "optuna.trial_number": str(trial.number),
            "mlflow.parentRunId": self.parent,
            **trial.tags,
        }
        run = self.client.create_run(
            experiment_id(self.client, uri, trial.study), tags=tags, run_name=trial.name
        )
        self.run_id = run.info.run_id
        params = {
            f"{group}.{key}": value for group, values in trial.config.items() for key, value in values.items()
        }
        params.update(trial.params)  # the value Optuna chose, under the same dotted name
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def epoch(self, metrics: EpochMetrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = scalars(metrics).items()
        if metrics.val_macro_f1 is not None:  # the trial's value is its best epoch's
            f1 = metrics.val_macro_f1
            self.best_f1 = f1 if self.best_f1 is None else max(self.best_f1, f1)
        self.client.log_batch(
            self.run_id, metrics=[Metric(mlflow_key(k), v, now, metrics.epoch) for k, v in values]
        )

    def files(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, state: str, reason: str | None) -> None:
        self.client.set_tag(self.run_id, "optuna.state", state)
        if reason:
            self.client.set_tag(self.run_id, Attr.FAIL_REASON if state == "FAIL" else "reason", reason[:8000])
        status = "KILLED" if reason == INTERRUPTED else MLFLOW_STATUS.get(state, "FAILED")
        self.client.set_terminated(self.run_id, status)
        if state == "COMPLETE" and self.best_f1 is not None:
            try:  # the run is closed with its own status; tagging the best must not reopen it as FAILED
                self._mark_if_best(self.best_f1)
            except Exception as err:
                log.warning("MLflow: trial %d's best tags not set: %s", self.number, mask_secrets(str(err)))

    def _mark_if_best(self, value: float) -> None:
        """Live, as trials finish; two workers finishing at once may both write (the dispatcher sets
        the final tags from the study when it ends)."""
        tags = self.client.get_run(self.parent).data.tags
        if "best_value" in tags and float(tags["best_value"]) >= value:
            return
        if tags.get("best_run_id"):
            self.client.set_tag(tags["best_run_id"], BEST, "false")
        _tag_best(self.client, self.parent, self.number, value, self.run_id)


@dataclass(frozen=True)
class Targets:
    """Where trials are tracked: hpo.run's --tensorboard DIR and --mlflow URI."""

    tensorboard: str | None = None
    mlflow: str | None = None

    def open(self, trial: TrialInfo) -> Trackers:
        trackers = Trackers()
        if self.tensorboard is not None:
            trackers.add("TensorBoard", lambda: TensorBoardTracker(str(self.tensorboard), trial))
        if self.mlflow is not None:
            trackers.add("MLflow", lambda: MlflowTracker(str(self.mlflow), trial))
        return trackers


@dataclass
class Trackers:
    """A trial's open trackers, each called in turn; one that fails is closed and dropped."""

    live: dict[str, Tracker] = field(default_factory=dict)

    def add(self, name: str, make: Callable[[], Tracker]) -> None:
        try:
            self.live[name] = make()
        except Exception as err:
            log.warning(
                "%s tracking is off for this trial: %s: %s", name, type(err).__name__, mask_secrets(str(err))
            )

    def epoch(self, metrics: EpochMetrics) -> None:
        self._each(lambda tracker: tracker.epoch(metrics))

    def files(self, paths: Sequence[Path]) -> None:
        self._each(lambda tracker: tracker.files(paths))

    def finish(self, state: str, reason: str | None = None) -> None:
        self._each(lambda tracker: tracker.finish(state, reason))
        self.live.clear()

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.live.items()):
            try:
                call(tracker)
            except Exception as err:
                log.warning(
                    "%s tracking is off for this trial: %s: %s",
                    name,
                    type(err).__name__,
                    mask_secrets(str(err)),
                )
                del self.live[name]
                with contextlib.suppress(Exception):
                    tracker.finish("FAIL", f"tracking failed: {err}")
