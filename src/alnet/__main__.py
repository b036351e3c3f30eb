"""`python -m alnet …` is the `alnet` command (where no console script is installed)."""

from .cli import app

app(prog_name="alnet")
