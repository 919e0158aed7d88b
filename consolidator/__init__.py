"""consolidator: a host manager for server consolidation on Linux."""

import os as _os

# pydantic looks for plugins in every installed distribution's entry points at import
# (about 30 ms); the CLI's latency matters and it uses none.
_os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

__version__ = "0.1.0"

# Here, not in state.py: the CLI needs it at import, and state.py pulls in the inventory's
# schema (pydantic), which a `status` must not pay for.
DEFAULT_STATE_DIR = "/var/lib/consolidator"
