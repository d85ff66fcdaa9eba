"""Which model to predict with: a registered version or a local file, both read as one model file.

A registered version (models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS)
carries the final run's model.pt beside its torch.export graph; a local path is that
model.pt, a study's best_model.pt, or the folder holding one (final/<label>-<stamp>/).
Either way the model is rebuilt from the model file (trainables.checkpoint.ModelFile),
never from the graph: saliency needs the layers, and the file holds the temperature
that calibrates the probabilities.

Parsing and local paths need the standard library only, so predict.py checks them
before anything heavy loads; MLflow loads only to resolve a registered version (search.tracking.registered,
which final.py --registered shares).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from search.tracking.registered import REGISTRY_PREFIX, RegisteredModel, download_registered, registered_model
from search.tracking.schema import BEST_MODEL_FILE, FINAL_MODEL_FILE

LOCAL_MODEL_FILES = (FINAL_MODEL_FILE, BEST_MODEL_FILE)
"""The model files a folder given as --model may hold, in order of preference."""
MODEL_FORMS = "models:/NAME/VERSION, models:/NAME@ALIAS or a path to a model.pt"


def model_source(text: str) -> RegisteredModel | Path:
    """--model as a registered version or an existing local model file; a ValueError says what is wrong."""
    if text.startswith(REGISTRY_PREFIX):
        registered = registered_model(text)
        if registered is None:
            raise ValueError(f"--model {text}: write {MODEL_FORMS}, e.g. models:/cnn-classifier/3")
        return registered
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
