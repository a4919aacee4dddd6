"""Model Control Plane helpers shared by the steps (ZenML's ``Model``: one version per training run)."""

from __future__ import annotations

from typing import Any

from zenml import get_step_context, log_metadata
from zenml.exceptions import StepContextError
from zenml.logger import get_logger

logger = get_logger(__name__)


def current_model():
    """The ZenML ``Model`` the running pipeline is bound to, or None."""
    try:
        return get_step_context().model
    except (RuntimeError, StepContextError):
        return None


def log_model_metadata(metadata: dict[str, Any]) -> None:
    """Log ``metadata`` on the running pipeline's model version (no-op for an unbound pipeline)."""
    if current_model() is None:
        return
    log_metadata(metadata=metadata, infer_model=True)
