"""The MLflow model registry as lowbit uses it: versions with lineage, two aliases, and their history.

    registry = Registry.open(params, root)           # a client whose server answered
    registry.version_at(registry.champion)           # the serving model, or None
    registry.move(registry.champion, "3", actor="promote", reason="...")

`@champion` (promote.champion_alias) is what serves (`models:/<name>@champion`); `@previous` is the champion it
replaced, so `lowbit rollback` has somewhere to go. MLflow keeps no history of aliases, so
every move is also written as a small run in the experiment `<tracking.experiment>-registry`
(tags: lowbit.kind=alias_move, the alias, from/to versions, who moved it and why);
`lowbit champion` prints it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from flows.mlflow_store import open_store
from flows.tracking import resolve_uri
from lowbit.config import Params, alias_name
from lowbit.errors import LowbitError

CHAMPION = "champion"  # the defaults of promote.champion_alias / previous_alias
PREVIOUS = "previous"


def check_alias(alias: str) -> str:
    try:
        return alias_name(alias)
    except ValueError as err:
        raise LowbitError(str(err)) from None


def connect(uri: str) -> MlflowClient:
    """A client for `uri` whose store answered (bounded waits), or an error naming what to set."""
    try:
        open_store(uri)
    except LowbitError as err:
        raise LowbitError(f"{err}; nothing was registered") from None
    # Global too, once it answered: registering a logged model (`models:/m-...`) resolves it
    # through MLflow's global tracking URI, whatever the client says.
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def not_found(err: MlflowException) -> bool:
    return err.error_code == "RESOURCE_DOES_NOT_EXIST"


def caller() -> str:
    """Who the server sees: the basic-auth user lowbit's requests carry, if any."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return f"MLflow user {user!r} (MLFLOW_TRACKING_USERNAME)" if user else "this MLflow client (MLFLOW_TRACKING_USERNAME not set)"


@contextlib.contextmanager
def permission_needed(uri: str, what: str, needs: str, grant: str) -> Iterator[None]:
    """A server's PERMISSION_DENIED in the block, as an error naming the user, the resource, the
    permission and what to change."""
    try:
        yield
    except MlflowException as err:
        if err.error_code != "PERMISSION_DENIED":
            raise
        raise LowbitError(
            f"{caller()} may not change {what} on the MLflow server {uri}: promotion needs {needs}. "
            f"An MLflow admin can grant it ({grant}), or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "to a user who has it. Nothing was registered and no alias moved") from None


@dataclass(frozen=True)
class AliasMove:
    alias: str
    from_version: str | None
    to_version: str
    actor: str
    reason: str


@dataclass
class Registry:
    client: MlflowClient
    name: str
    history_experiment: str
    champion: str = CHAMPION
    previous: str = PREVIOUS

    @classmethod
    def open(cls, params: Params, root: Path) -> Registry:
        client = connect(resolve_uri(params.tracking.uri, root))
        policy = params.promote
        return cls(client, policy.registered_model, f"{params.tracking.experiment}-registry",
                   policy.champion_alias, policy.previous_alias)

    def exists(self) -> bool:
        try:
            self.client.get_registered_model(self.name)
            return True
        except MlflowException as err:
            if not_found(err):
                return False
            raise

    def require(self) -> None:
        """For operations that only move aliases: the model must exist already."""
        if not self.exists():
            known = [m.name for m in self.client.search_registered_models(max_results=50)]
            raise LowbitError(f"registered model {self.name!r} does not exist (promote.registered_model in params.yaml); "
                              f"registered models: {', '.join(known) or 'none yet — run `lowbit promote` first'}")

    def ensure(self) -> None:
        if not self.exists():
            try:
                self.client.create_registered_model(
                    self.name, description="Variants promoted by lowbit; @champion serves, @previous is the one before.")
            except MlflowException as err:  # created meanwhile by a concurrent promotion
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

    def check_writable(self, run: Run) -> None:
        """Refuse now, before anything is written, if the server will refuse a write promotion makes.

        Promotion writes to the pipeline run's experiment (the served model is logged under the
        variant's run, the outcome tagged on the pipeline run), to the registered model (a version,
        the aliases) and to the alias history. On a server with permissions (MLflow basic auth)
        the natural order would log the model, then create the version, and meet a READ-only
        user's 403 only there or at the alias: a half-done promotion. Permission APIs belong to
        MLflow's basic-auth app (other auth in front of MLflow has none), so instead each resource
        is tried with a write that needs the same permission and changes nothing: the registered
        model's own description written back, the pipeline run's lowbit.kind tag (and one of the
        history's) set to the value it has. A model that does not exist yet is created by the
        promotion itself, and on MLflow's basic auth any user may create one (becoming its MANAGE)."""
        uri = self.client.tracking_uri

        def grant(kind: str, name: str) -> str:
            return f"mlflow.server.get_app_client('basic-auth', uri).grant_user_permission(user, {kind!r}, {name!r}, 'EDIT')"

        with permission_needed(uri, f"registered model {self.name!r} (promote.registered_model)",
                               "EDIT or MANAGE on it to register a version and move its aliases",
                               grant("registered_model", self.name)):
            if self.exists():
                model = self.client.get_registered_model(self.name)
                self.client.update_registered_model(self.name, model.description or "")
        experiment = self.client.get_experiment(run.info.experiment_id).name
        with permission_needed(uri, f"experiment {experiment!r} (tracking.experiment)",
                               "EDIT on it to log the promoted model and tag the pipeline run",
                               grant("experiment", run.info.experiment_id)):
            self.client.set_tag(run.info.run_id, "lowbit.kind", run.data.tags.get("lowbit.kind", "pipeline"))
        history = self.client.get_experiment_by_name(self.history_experiment)
        moves = self.client.search_runs([history.experiment_id], max_results=1) if history else []
        with permission_needed(uri, f"experiment {self.history_experiment!r} (the alias history)",
                               "EDIT on it to record alias moves",
                               grant("experiment", history.experiment_id if history else "")):
            for move in moves:
                self.client.set_tag(move.info.run_id, "lowbit.kind", move.data.tags.get("lowbit.kind", "alias_move"))

    def version_at(self, alias: str) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(self.name, check_alias(alias))
        except MlflowException as err:
            if not_found(err) or "alias" in str(err).lower():
                return None
            raise

    def version(self, number: str) -> ModelVersion:
        try:
            return self.client.get_model_version(self.name, str(number))
        except MlflowException as err:
            if not_found(err):
                raise LowbitError(f"registered model {self.name!r} has no version {number!r}") from None
            raise

    def versions(self) -> list[ModelVersion]:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(found, key=lambda v: int(v.version))

    def version_with_files(self, model_sha256: str) -> ModelVersion | None:
        """An earlier version holding exactly these model files (a retrain that changed nothing)."""
        for found in self.versions():
            if found.tags.get("lowbit.model_sha256") == model_sha256:
                return found
        return None

    def register(self, model_uri: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
        self.ensure()
        # A logged model's URI (models:/m-<id>) names the model; an MLflow server refuses such a
        # source unless model_id says it too (a local SQLite store does not check).
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        return self.client.create_model_version(self.name, model_uri, run_id=run_id, tags=tags, model_id=model_id)

    def tag(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, str(value)[:5000])

    def move(self, alias: str, version: str, actor: str, reason: str, context: dict[str, str] | None = None) -> AliasMove:
        """Point `alias` at `version` and record the move (MLflow keeps no alias history)."""
        before = self.version_at(alias)
        self.client.set_registered_model_alias(self.name, check_alias(alias), str(version))
        move = AliasMove(alias, str(before.version) if before else None, str(version), actor, reason)
        self._record(move, context or {})
        return move

    def _record(self, move: AliasMove, context: dict[str, str]) -> None:
        found = self.client.get_experiment_by_name(self.history_experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.history_experiment)
        run = self.client.create_run(experiment_id, run_name=f"{self.name}@{move.alias} -> v{move.to_version}", tags={
            "lowbit.kind": "alias_move", "lowbit.registered_model": self.name, "lowbit.alias": move.alias,
            "lowbit.from_version": move.from_version or "", "lowbit.to_version": move.to_version,
            "lowbit.actor": move.actor, "lowbit.reason": move.reason[:5000], **context,
        })
        self.client.set_terminated(run.info.run_id, "FINISHED")

    def history(self, limit: int = 20) -> list[dict]:
        found = self.client.get_experiment_by_name(self.history_experiment)
        if found is None:
            return []
        runs = self.client.search_runs(
            [found.experiment_id], f"tags.`lowbit.registered_model` = '{self.name}'",
            order_by=["attributes.start_time DESC"], max_results=limit)
        return [{"time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000)),
                 **{key.removeprefix("lowbit."): value for key, value in run.data.tags.items()
                    if key in ("lowbit.alias", "lowbit.from_version", "lowbit.to_version", "lowbit.actor", "lowbit.reason")}}
                for run in runs]


def rollback(registry: Registry, reason: str, to_version: str | None = None) -> AliasMove:
    """@champion back to @previous (or to `to_version`); the replaced champion becomes @previous,
    so a second rollback undoes the first."""
    registry.require()
    champion = registry.version_at(registry.champion)
    target = registry.version(to_version) if to_version else registry.version_at(registry.previous)
    if target is None:
        raise LowbitError(f"{registry.name} has no @{registry.previous} to roll back to; name a version with --to")
    if champion is not None and str(champion.version) == str(target.version):
        raise LowbitError(f"v{target.version} is already {registry.name}@{registry.champion}; nothing to roll back")
    if champion is not None:
        registry.move(registry.previous, str(champion.version), "rollback", f"rolled back to v{target.version}: {reason}")
    registry.tag(str(target.version), {"lowbit.rolled_back_to": reason})
    return registry.move(registry.champion, str(target.version), "rollback", reason)
