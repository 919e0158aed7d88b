"""The project's tools; scripts run as ``python tools/<name>.py``, and ``fleetdir`` is
shared with the tests."""
