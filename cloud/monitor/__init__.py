"""Watching a run: the coordinator's event stream and what it feeds (dashboard, Prometheus, TensorBoard)."""
