"""The model zoo: models.yaml, offline stand-ins of real architectures, and the resolver."""

from .catalog import CatalogError, ModelEntry, get_entry, load_catalog, select
from .resolve import TIERS, HubUnavailable, resolve

__all__ = [
    "CatalogError",
    "HubUnavailable",
    "ModelEntry",
    "TIERS",
    "get_entry",
    "load_catalog",
    "resolve",
    "select",
]
