"""The `medlora` command: one verb per stage. Each command only parses arguments and calls one
function; the commands live in the `*_cmds.py` modules beside this one, grouped by stage.

The imports below register the commands; their order is the order of `medlora --help`.
"""

# isort: skip_file
from medlora.cli import data_cmds, train_cmds, eval_cmds, audit_cmds, share_cmds, serve_cmds  # noqa: F401
from medlora.cli.app import BUNDLED_RECIPES, app

__all__ = ["BUNDLED_RECIPES", "app", "main"]


def main() -> None:
    app()
