"""The command line (click, rich): parsing, rendering, the console, the host doctor.

Imports inside ``main``'s commands are deliberate: each command loads only what it
uses, which keeps a no-op ``apply`` and ``status`` fast to start. They never stand in
for a layering problem: ``lint-imports`` checks the layers with them included.
"""
