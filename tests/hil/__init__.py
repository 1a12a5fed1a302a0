"""Hardware-in-the-loop conformance suite and its pytest plugin (see README.md)."""
