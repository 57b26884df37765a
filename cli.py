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


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg="red", err=True)
    raise typer.Exit(1) from None


@app.command()
def export(
    out: Path = typer.Argument(..., help="the checkpoint to write (.safetensors)"),
    row: str = typer.Option(..., help="a row of params.yaml, e.g. dmq-w4a8: its weights and activation parameters"),
    params: Path = typer.Option(Path("params.yaml"), help="the params the artifacts were made with (stored in the header)"),
) -> None:
    """Write one portable safetensors checkpoint of a row: packed 4-bit weights, scales, zero points, γ,
    per-step activation parameters and PTS exponents, with the params and the FP model's hash."""
    from pipeline.config import ConfigError, load_config
    from pipeline.export import export_checkpoint
    from pipeline.fingerprint import model_hash
    from stages.layout import FP_MODEL, act_params_path, weights_path

    try:
        cfg = load_config(params)
        if row not in cfg.rows:
            raise ValueError(f"no row {row!r} in {params}; rows: {', '.join(cfg.rows)}")
        weights = weights_path(cfg.rows[row].weights)
        header = export_checkpoint(out, weights, act_params_path(row), FP_MODEL, model_hash(FP_MODEL), cfg.model_dump(mode="json"))
    except (ConfigError, FileNotFoundError, ValueError) as error:
        _fail(error)
    typer.echo(f"{out}: W{header['w_bits']}A{header['a_bits']}, {header['steps']} steps, {out.stat().st_size} bytes")


@app.command()
def sample(
    quantized: Path = typer.Option(..., help="a checkpoint written by `export`"),
    model: Path = typer.Option(..., help="the FP model folder it was exported from (pipeline layout or bare UNet)"),
    out: Path = typer.Option(Path("samples.safetensors"), help="samples in [-1, 1] (pixels); a PNG grid is written next to it"),
    num_samples: int = typer.Option(16, min=1),
    batch_size: int = typer.Option(16, min=1),
    seed: int | None = typer.Option(None, help="default: sample.seed of the checkpoint's params"),
    prompts: Path | None = typer.Option(None, help="text-to-image models: prompts file (default: sample.prompts of the params)"),
    guidance_scale: float | None = typer.Option(None, help="default: sample.guidance_scale of the params"),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
) -> None:
    """Sample from a portable checkpoint, without the DVC repository: DDIM with the steps and η the
    checkpoint was calibrated for."""
    from pipeline.components import find_layout
    from pipeline.conditioning import Decoder, load_denoiser, read_prompts
    from pipeline.diffusion import ddim_scheduler, resolve_device
    from pipeline.export import load_checkpoint
    from pipeline.figures import save_grid
    from pipeline.io import write_tensors
    from pipeline.sampling import generate

    try:
        unet, train_scheduler, _, header = load_checkpoint(quantized, model)
        s = header["config"]["sample"]
        prompt_file = prompts or s.get("prompts")
        denoiser = load_denoiser(model, unet, read_prompts(prompt_file) if prompt_file else None)
    except (FileNotFoundError, ValueError) as error:
        _fail(error)
    run_on = resolve_device(device)
    scheduler = ddim_scheduler(train_scheduler, header["steps"])
    seed = s["seed"] if seed is None else seed
    scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    latents = generate(denoiser.to(run_on), scheduler, num_samples, batch_size, s["eta"], seed, run_on, "sample", scale)
    images = Decoder(find_layout(model), run_on)(latents)
    write_tensors(out, {"images": images}, {"checkpoint": str(quantized), "seed": seed, "guidance_scale": scale})
    grid = out.with_suffix(".png")
    save_grid(images, grid, max(1, int(len(images) ** 0.5)), f"{header['method']} W{header['w_bits']}A{header['a_bits']}")
    typer.echo(f"{out}: {tuple(images.shape)}, grid {grid}; range [{float(images.min()):.3g}, {float(images.max()):.3g}]")


if __name__ == "__main__":
    app()
