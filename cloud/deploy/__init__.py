"""Deployment tooling behind `fedcmd deploy ...`: certificates, password file and ACL (`security.py`), the
fleet inventory (`inventory.py`) and the systemd units rendered from it (`systemd_units.py`)."""
