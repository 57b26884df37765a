"""dmq: command line for the DMQ pipeline (wraps the library and the DVC stages for people)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="DMQ post-training quantization of diffusion models, as a DVC pipeline.", no_args_is_help=True)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a Zarr store, e.g. artifacts/calib.zarr"),
    layer: str | None = typer.Option(None, help="module path of one layer: print its per-channel ranges"),
    step: int = typer.Option(0, help="sampling step index for --layer (0 = noisiest)"),
    kind: str = typer.Option("input", help="input or output, for --layer"),
    stats: bool = typer.Option(True, help="compute min/max/mean of every array"),
) -> None:
    """Print a Zarr store's tree (shapes, dtypes, chunks, min/max/mean), or one layer's channel ranges."""
    from pipeline.inspect import layer_channel_ranges, store_tree

    try:
        if layer is None:
            typer.echo("\n".join(store_tree(path, stats)))
            return
        ranges = layer_channel_ranges(path, layer, step, kind)
    except (FileNotFoundError, KeyError, ValueError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{layer} {kind} at step {step}: {len(ranges)} channels")
    typer.echo(f"{'channel':>7} {'min':>10} {'max':>10} {'range':>10}")
    for c, (lo, hi) in enumerate(ranges):
        typer.echo(f"{c:>7} {lo:>10.4g} {hi:>10.4g} {hi - lo:>10.4g}")


@app.command("check-params")
def check_params(path: Path = typer.Argument(Path("params.yaml"))) -> None:
    """Validate a params file against the config model; print the first problem with its key."""
    from pipeline.config import ConfigError, load_config

    try:
        load_config(path)
    except ConfigError as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{path}: ok")


@app.command()
def doctor(
    params: Path = typer.Option(Path("params.yaml"), help="the params file a run would use"),
    artifacts: Path = typer.Option(Path("artifacts"), help="where the stages write their stores"),
) -> None:
    """Check the environment before a long run: package versions, torch threads, the device, the
    model, and disk space for the Zarr stores that the params imply."""
    from pipeline.doctor import diagnose

    findings = diagnose(params, artifacts, copies=2)  # each store lives in the workspace and in the DVC cache
    for finding in findings:
        typer.echo(f"{'ok' if finding.ok else 'PROBLEM':>7}  {finding.check}: {finding.detail}")
    problems = sum(not finding.ok for finding in findings)
    if problems:
        typer.secho(f"{problems} problem(s) found", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo("no problems found")


if __name__ == "__main__":
    app()
