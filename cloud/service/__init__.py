"""The coordinator service: the round loop (`coordinator.py`), checks on every message a device sends
(`validation.py`), and `fedcmd cloud serve` around them (`serve.py`)."""
