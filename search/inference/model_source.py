"""Which model to predict with: a registered version or a local file, both read as one model file.

A registered version (models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS)
carries the final run's model.pt beside its torch.export graph; a local path is that
model.pt, a study's best_model.pt, or the folder holding one (final/<label>-<stamp>/).
Either way the model is rebuilt from the model file (trainables.checkpoint.ModelFile),
never from the graph: saliency needs the layers, and the file holds the temperature
that calibrates the probabilities.

Parsing and local paths need the standard library only, so predict.py checks them
before anything heavy loads; MLflow loads only to resolve a registered version.
"""

from __future__ import annotations

import posixpath
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from search.errors import UsageError, one_line
from search.tracking.schema import BEST_MODEL_FILE, FINAL_MODEL_FILE, MODEL_FILE_IN_MODEL

REGISTRY_PREFIX = "models:/"
LOCAL_MODEL_FILES = (FINAL_MODEL_FILE, BEST_MODEL_FILE)
"""The model files a folder given as --model may hold, in order of preference."""
MODEL_FORMS = "models:/NAME/VERSION, models:/NAME@ALIAS or a path to a model.pt"
_REGISTERED = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))")


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


def model_source(text: str) -> RegisteredModel | Path:
    """--model as a registered version or an existing local model file; a ValueError says what is wrong."""
    if text.startswith(REGISTRY_PREFIX):
        match = _REGISTERED.fullmatch(text.rstrip("/"))
        if match is None:
            raise ValueError(f"--model {text}: write {MODEL_FORMS}, e.g. models:/cnn-classifier/3")
        return RegisteredModel(match["name"], match["version"] or "", match["alias"] or "")
    if "://" in text or text.startswith(("runs:/", "models:")):
        raise ValueError(f"--model {text}: give {MODEL_FORMS}")
    return local_model_file(Path(text))


def local_model_file(path: Path) -> Path:
    """The model file itself, or the one a folder holds (final.py's model.pt before a study's best_model.pt)."""
    if path.is_dir():
        for name in LOCAL_MODEL_FILES:
            if (path / name).is_file():
                return path / name
        held = " or ".join(LOCAL_MODEL_FILES)
        raise ValueError(f"--model {path}: the folder holds no {held}; give final.py's results folder or the file")
    if not path.is_file():
        raise ValueError(f"--model {path}: no such file or folder; give {MODEL_FORMS}")
    return path


# ---------------------------------------------------------------- the registry


@contextmanager
def fetched_model_file(source: RegisteredModel | Path, tracking_uri: str) -> Iterator[Path]:
    """A local path to the model file while the context lasts (a registered one is downloaded to a
    temporary folder, removed afterwards)."""
    if isinstance(source, Path):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="predict-model-") as folder:
        yield download_registered(source, tracking_uri, Path(folder))


def download_registered(model: RegisteredModel, tracking_uri: str, folder: Path) -> Path:
    from search.tracking.schema import sqlite_path, store_exists

    if not store_exists(tracking_uri):  # reading must not create an empty store
        raise UsageError(
            f"no MLflow store at {sqlite_path(tracking_uri)}: pass --tracking-uri of the store search/final.py "
            f"registered {model.name} in"
        )
    # Deferred: MLflow loads only for a registered model.
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from search.tracking.store import mlflow_client

    client = mlflow_client(tracking_uri, create=False)
    version = find_version(client, model, tracking_uri)
    root = artifact_location(client, version)
    where = f"{model} (version {version.version})"
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
