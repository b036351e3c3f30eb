"""The `alnet` command. Thin by design: each command parses its options, calls the package and prints.

Commands are grouped by what they work on: `data.py` (info, verify, prepare, synth), `train.py` (train, evaluate,
compare, tune, demo), `infer.py` (predict, explain, quantize, export, package, serve) and `gan.py` (gan train,
sample, quality); `common.py` holds what they share.
"""

from __future__ import annotations

import typer

from ..memory import keep_freed_memory
from . import data, gan, infer, train

app = typer.Typer(
    help="ALNet for C-NMC 2019 cell images (ALL vs HEM): check and prepare data, train and evaluate (paper or "
    "subject-level protocol), compare with baselines, explain, tune, predict, export and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _every_command() -> None:
    keep_freed_memory()  # before any tensor is made: freed activation maps are reused, not faulted in again

# In the order a user meets them: look at the data, train and test, look inside, use the model.
for command in (data.info, data.verify, data.prepare, data.synth, train.train, train.evaluate, train.compare,
                infer.explain, train.tune, infer.predict, infer.quantize, infer.export, infer.package, infer.serve,
                train.demo):
    app.command(command.__name__)(command)
app.add_typer(gan.app, name="gan")
