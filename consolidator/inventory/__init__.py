"""Inventory: YAML with positions, the pydantic schema, and the checks of meaning."""

from .load import DEFAULT_FILE, load_inventory, parse_inventory
from .schema import Inventory, json_schema

__all__ = ["DEFAULT_FILE", "Inventory", "json_schema", "load_inventory", "parse_inventory"]
