"""Inventory: YAML with positions, the pydantic schema, and the checks of meaning.

It knows the file and its rules; :mod:`consolidator.model` builds the fleet from what
it validated.
"""

from .load import DEFAULT_FILE, load_inventory, read_inventory, validate
from .schema import Inventory, json_schema

__all__ = ["DEFAULT_FILE", "Inventory", "json_schema", "load_inventory", "read_inventory",
           "validate"]
