"""`fedcmd experiment`: grids of simulations, resumable, with tables and curves (`grid.py`)."""
