"""The ``longtail`` command line. Each subcommand is a thin layer over a library call."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Longtail Guidance: mine a classifier's longtail.")
heads_app = typer.Typer(no_args_is_help=True, help="Epistemic Head utilities.")
app.add_typer(heads_app, name="heads")


@heads_app.command("overhead")
def heads_overhead(
    arch: str = typer.Option("vit_b_16", help="torchvision name (vit_b_16, resnet50 ...) or timm:<name>"),
    num_classes: int = typer.Option(1000, help="number of classes C"),
    heads: int = typer.Option(5, help="number of heads K"),
    head_name: str | None = typer.Option(None, help="module path of the head, if it is not found automatically"),
) -> None:
    """Parameters an Epistemic Head adds to an architecture (random weights, nothing downloaded)."""
    from .heads import build_architecture, parameter_overhead

    stats = parameter_overhead(build_architecture(arch, num_classes), heads, head_name)
    typer.echo(f"architecture {arch}: C={stats['num_classes']} classes, d_model={stats['d_model']}, K={heads} heads")
    typer.echo(f"base parameters:  {stats['base_params']:,}")
    extra = stats["added_with_bias"] - stats["added_params"]
    typer.echo(f"added parameters: {stats['added_params']:,} (K x d x C) + {extra:,} biases")
    typer.echo(f"overhead: {stats['percent']:.2f}%")


def main() -> None:
    app()
