"""The Typer app, shared options and the one-line error wrapper every `medlora` command uses."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from medlora.errors import ConfigError, MedloraError

app = typer.Typer(
    help="Turn a general LLM into a medical QA model with LoRA: data → train → eval.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare and inspect training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])
BUNDLED_RECIPES = Path(__file__).parent.parent / "recipes"

# Options several commands share (each command's --out says what it writes there).
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: section.key=value (repeatable)."),
]
RecipeArgument = Annotated[
    str, typer.Argument(help="Recipe YAML or bundled name (smollm2-135m-cpu).")
]
OptionalRecipeArgument = Annotated[str | None, typer.Argument(help="Recipe YAML or bundled name.")]
PreparedDataOption = Annotated[
    Path | None, typer.Option("--data", help="Folder written by `medlora data prepare`.")
]
ColumnMapOption = Annotated[str | None, typer.Option("--map", help="question=COL,answer=COL")]
AdapterOption = Annotated[
    Path | None, typer.Option("--adapter", "-a", help="Run directory with the adapter.")
]


def user_errors(func: F) -> F:
    """Print a MedloraError as one line and exit 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MedloraError as error:
            # The message is plain text: "[a,b]" in it must print, not be read as rich markup.
            err_console.print(
                Text.assemble(("error:", "bold red"), f" {error}"), highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # PEFT 0.21.2 (peft_model.py) reads transformers 5.24's deprecated `is_gradient_checkpointing`;
    # the FutureWarning asks the user to change code that is neither theirs nor medlora's.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


def resolve_recipe_path(recipe: str | None) -> Path | None:
    """A recipe path, or the name of a bundled recipe (`smollm2-135m-cpu`)."""
    if recipe is None:
        return None
    path = Path(recipe)
    if path.is_file():
        return path
    bundled = BUNDLED_RECIPES / f"{recipe.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED_RECIPES.glob("*.yaml")))
    raise ConfigError(f"recipe not found: {recipe} (give a YAML path or one of: {names})")


def _load(recipe: str | None, overrides: list[str] | None) -> Any:
    from medlora.config import load_recipe

    return load_recipe(resolve_recipe_path(recipe), overrides)


def parse_map(text: str | None) -> dict[str, str]:
    """`question=Q,answer=A` → {"question": "Q", "answer": "A"}."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"--map '{part}' must look like question=COLUMN,answer=COLUMN")
        ours, theirs = part.split("=", 1)
        mapping[ours.strip()] = theirs.strip()
    return mapping
