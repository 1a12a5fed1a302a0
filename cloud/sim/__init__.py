"""Simulation: one process (`simulate.py`, memory transport) or a fleet of real MQTT agents in worker
processes (`fleet.py`), both assembled by `setup.py`. The only part of `cloud` that imports `edge_agent`:
a simulation runs the real device code in-process."""
