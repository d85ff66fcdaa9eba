"""The registered model version a final retrain made: in metrics.json, the run's tag, the card and its tags."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Registration:
    """A version of a registered model, and the logged model behind it."""

    name: str
    version: int
    model_uri: str
    """The logged model's URI (models:/m-...), as MLflow gave it."""
    model_id: str
    """The logged model's id: its tags are set with the version's."""

    @property
    def title(self) -> str:
        """'cnn-classifier version 3'."""
        return f"{self.name} version {self.version}"

    @property
    def version_uri(self) -> str:
        """models:/NAME/VERSION: to load or serve it."""
        return f"models:/{self.name}/{self.version}"

    @property
    def tag(self) -> str:
        """NAME/VERSION: the final run's registered_model tag."""
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """As metrics.json's "mlflow" block holds it (beside the tracking URI and the run)."""
        return asdict(self)
