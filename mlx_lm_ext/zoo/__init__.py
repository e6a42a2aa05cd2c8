"""The model zoo: models.yaml, offline stand-ins of real architectures, and the resolver."""

from .catalog import CatalogError, ModelEntry, get_entry, load_catalog, select
from .recall import RecallSpec, RecallUnsupported
from .resolve import TIERS, HubUnavailable, resolve, resolve_recall

__all__ = [
    "CatalogError",
    "HubUnavailable",
    "ModelEntry",
    "RecallSpec",
    "RecallUnsupported",
    "TIERS",
    "get_entry",
    "load_catalog",
    "resolve",
    "resolve_recall",
    "select",
]
