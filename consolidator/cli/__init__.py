"""The command line (click, rich): parsing, rendering, the console, the host doctor.

Imports inside ``main``'s commands are deliberate: each command loads only what it
uses, which keeps a no-op ``apply`` and ``status`` fast to start. They never stand in
for a layering problem: ``lint-imports`` checks the layers with them included.
"""


def main() -> None:
    """The ``consolidator`` command: plain queries by the quick path (:mod:`.quick`),
    everything else, and whatever it declines, by the full CLI (:mod:`.main`)."""
    import sys
    from . import quick
    try:
        if quick.run(sys.argv[1:]):
            return
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)                      # ExitCode.INTERRUPTED, as the full CLI
    from .main import main as full
    full()
