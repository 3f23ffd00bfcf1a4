"""``vectorsync models``: make the models embedders load (offline, from local folders)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from .cli import VerboseOption, _execute, _say, _setup_logging, err
from .embed.model2vec import DEFAULT_DIMS

__all__ = ["models_app"]

models_app = typer.Typer(
    help="Models for the embedders: made offline from local model folders.",
    no_args_is_help=True,
)


@models_app.command("distill")
def distill(
    source: Annotated[
        Path,
        typer.Option(
            "--from",
            envvar="VECTORSYNC_DISTILL_FROM",
            show_envvar=True,
            help="a local sentence-transformers model folder, e.g. the bundled MiniLM's",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            envvar="VECTORSYNC_DISTILL_OUT",
            show_envvar=True,
            help="the model2vec folder to write (it must not exist, unless --force)",
        ),
    ],
    dims: Annotated[
        int,
        typer.Option(
            "--dims",
            min=1,
            envvar="VECTORSYNC_DISTILL_DIMS",
            show_envvar=True,
            help="dimensions of the vectors (PCA), at most the source model's",
        ),
    ] = DEFAULT_DIMS,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            envvar="VECTORSYNC_DISTILL_FORCE",
            show_envvar=True,
            help="replace --out if it exists (once the new model is complete)",
        ),
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Distil a static model2vec model from a sentence-transformers model, offline: a
    minute or so for MiniLM on 2 cores. Use it with kind = "model2vec", path = <--out>."""
    from .embed.model2vec import distill as distil_model

    _setup_logging(verbose)
    if not err.is_terminal:
        os.environ.setdefault("TQDM_DISABLE", "1")  # model2vec's bar is for a terminal only
    _execute(
        lambda _: asyncio.to_thread(distil_model, source, out, dims=dims, force=force, say=_say)
    )
