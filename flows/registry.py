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

import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
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
        return self.client.create_model_version(self.name, model_uri, run_id=run_id, tags=tags)

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
