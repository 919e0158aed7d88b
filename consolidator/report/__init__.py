"""The capacity report: history in SQLite, capacity maths, the document and its renderings.

``history`` records and downsamples samples (the supervisor writes, ``report`` reads);
``capacity`` is the pure maths of what fits; ``document`` builds the report (format 1);
``text`` and ``html`` render it.
"""
