"""`python -m kws` runs the command line, as the `kws` script does."""

from kws.cli import app

app(prog_name="kws")
