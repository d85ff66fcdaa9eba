"""A version of a registered model, found in the registry and its model file fetched.

predict.py (search.inference) runs a registered version on new images; final.py --registered
(search.final_model.external) tests one on an external set: both fetch the same model.pt,
the final run's model file that the version carries beside its torch.export graph. Here,
below both, since neither of those packages may import the other.

Parsing needs the standard library only, so the scripts check a name before anything heavy
loads; MLflow loads only to resolve a version.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from search.errors import UsageError, one_line
from search.tracking.schema import MODEL_FILE_IN_MODEL

REGISTRY_PREFIX = "models:/"
_REGISTERED = re.compile(r"(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))")


@dataclass(frozen=True)
class RegisteredModel:
    """A version of a registered model, named by its number, 'latest' or an alias."""

    name: str
    version: str = ""
    """Digits, or 'latest' (the highest); empty when an alias names it."""
    alias: str = ""

    def __str__(self) -> str:
        named = f"@{self.alias}" if self.alias else f"/{self.version}"
        return f"{REGISTRY_PREFIX}{self.name}{named}"


def registered_model(text: str) -> RegisteredModel | None:
    """NAME/VERSION, NAME/latest or NAME@ALIAS, with or without models:/ before it; None for anything else."""
    match = _REGISTERED.fullmatch(text.removeprefix(REGISTRY_PREFIX).rstrip("/"))
    if match is None:
        return None
    return RegisteredModel(match["name"], match["version"] or "", match["alias"] or "")


def download_registered(model: RegisteredModel, tracking_uri: str, folder: Path) -> Path:
    """The version's model file, downloaded into folder."""
    client, version = resolved_version(model, tracking_uri)
    return download_model_file(client, version, tracking_uri, folder, f"{model} (version {version.version})")


def resolved_version(model: RegisteredModel, tracking_uri: str):
    """(client, ModelVersion) of `model` in an existing store; a one-line UsageError for a missing store, name,
    version or alias."""
    from search.tracking.schema import sqlite_path, store_exists

    if not store_exists(tracking_uri):  # reading must not create an empty store
        raise UsageError(
            f"no MLflow store at {sqlite_path(tracking_uri)}: pass --tracking-uri of the store search/final.py "
            f"registered {model.name} in"
        )
    from search.tracking.store import mlflow_client  # deferred: MLflow loads only for a registered model

    client = mlflow_client(tracking_uri, create=False)
    return client, find_version(client, model, tracking_uri)


def download_model_file(client, version, tracking_uri: str, folder: Path, where: str) -> Path:
    """The model file of a ModelVersion, downloaded into folder; `where` names the version in the errors."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    root = artifact_location(client, version)
    try:
        repository = get_artifact_repository(root, tracking_uri=tracking_uri)
        held = {entry.path for entry in repository.list_artifacts(posixpath.dirname(MODEL_FILE_IN_MODEL))}
        if MODEL_FILE_IN_MODEL not in held:
            raise UsageError(
                f"{where} holds no {MODEL_FILE_IN_MODEL}: it was registered before final.py stored its model file "
                f"there; re-run search/final.py for its study to register a version that has it"
            )
        return Path(repository.download_artifacts(MODEL_FILE_IN_MODEL, dst_path=str(folder)))
    except UsageError:
        raise
    except Exception as error:  # the store's files are out of reach: a bucket's credentials, a server gone
        raise UsageError(f"{where}: cannot fetch {root}/{MODEL_FILE_IN_MODEL}: {one_line(error)}") from None


def artifact_location(client, version) -> str:
    """Where the version's files are, found through this client. Never a models:/ URI: MLflow's resolver
    of those asks the process-wide registry (a new mlflow.db in the working folder, when none is set),
    not the tracking_uri it is given (mlflow 3.17)."""
    root = client.get_model_version_download_uri(version.name, version.version)
    if root.startswith(REGISTRY_PREFIX):  # a logged model's id (MLflow 3): its own artifact location
        root = client.get_logged_model(root.removeprefix(REGISTRY_PREFIX)).artifact_location
    return root


def find_version(client, model: RegisteredModel, tracking_uri: str):
    """The ModelVersion `model` names, or a one-line UsageError naming what the registry does hold."""
    from mlflow.exceptions import MlflowException

    from search.tracking.store import quoted

    try:
        registered = client.get_registered_model(model.name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
        held = ", ".join(names) if names else "none yet (search/final.py registers one)"
        raise UsageError(f"{model}: no registered model {model.name!r} in {tracking_uri}; registered: {held}") from None
    if model.alias:
        if model.alias not in registered.aliases:
            aliases = ", ".join(sorted(registered.aliases)) or "none"
            raise UsageError(f"{model}: {model.name} has no alias {model.alias!r}; its aliases: {aliases}")
        return client.get_model_version(model.name, registered.aliases[model.alias])
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = {quoted(model.name)}"))
    if not numbers:
        raise UsageError(f"{model}: {model.name} has no versions; search/final.py registers one")
    wanted = numbers[-1] if model.version == "latest" else int(model.version)
    if wanted not in numbers:
        raise UsageError(f"{model}: {model.name} has no version {wanted}; its versions: {', '.join(map(str, numbers))}")
    return client.get_model_version(model.name, str(wanted))
