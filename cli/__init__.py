"""Command-line entry points: `tokenkit` (cli/tokenkit.py) and `mapet` (cli/mapet.py)."""
