"""Benchmark engines behind `fedcmd bench ...`: kernels, fleet, hostile devices, partitioning. Each
measures against a named baseline in the same run and reports ratios; the commands in `cloud/cli` stay thin."""
