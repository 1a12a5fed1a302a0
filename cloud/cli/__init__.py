"""The `fedcmd` command line. `main.py` holds the app and the one table that mounts every sub-app and
command; each sub-app lives in its own module and only parses flags and prints (the work is elsewhere)."""
