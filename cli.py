"""dmq: command line for the DMQ pipeline (wraps the library and the DVC stages for people)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NoReturn

import typer

from pipeline.infra.allocator import keep_freed_memory

keep_freed_memory()  # like every stage process: the commands that sample or quantize run torch in this one
app = typer.Typer(help="DMQ post-training quantization of diffusion models, as a DVC pipeline.", no_args_is_help=True)


def _fail(error: Exception | str) -> NoReturn:
    typer.secho(f"error: {error}", fg="red", err=True)
    raise typer.Exit(1) from None


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a Zarr store, e.g. artifacts/calib.zarr"),
    layer: str | None = typer.Option(None, help="module path of one layer: print its per-channel ranges"),
    step: int = typer.Option(0, help="sampling step index for --layer (0 = noisiest)"),
    kind: str = typer.Option("input", help="input or output, for --layer"),
    stats: bool = typer.Option(True, help="compute min/max/mean of every array"),
) -> None:
    """Print a Zarr store's tree (shapes, dtypes, chunks, min/max/mean), or one layer's channel ranges."""
    from pipeline.eval.inspection import layer_channel_ranges, store_tree

    try:
        if layer is None:
            typer.echo("\n".join(store_tree(path, stats)))
            return
        ranges = layer_channel_ranges(path, layer, step, kind)
    except (FileNotFoundError, KeyError, ValueError) as error:
        _fail(error)
    typer.echo(f"{layer} {kind} at step {step}: {len(ranges)} channels")
    typer.echo(f"{'channel':>7} {'min':>10} {'max':>10} {'range':>10}")
    for c, (lo, hi) in enumerate(ranges):
        typer.echo(f"{c:>7} {lo:>10.4g} {hi:>10.4g} {hi - lo:>10.4g}")


@app.command("check-params")
def check_params(path: Path = typer.Argument(Path("params.yaml"))) -> None:
    """Validate a params file against the config model; print the first problem with its key."""
    from pipeline.config import ConfigError
    from pipeline.params import load_config
    from pipeline.preflight import notices

    try:
        cfg = load_config(path)
    except ConfigError as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(1) from None
    for line in notices(cfg):
        typer.echo(line)
    typer.echo(f"{path}: ok")


# the options of a CompVis checkpoint beside it, shared by import-ckpt and doctor --ckpt
FIRST_STAGE = typer.Option(
    None, help="the autoencoder's checkpoint, for a .ckpt without first_stage_model.* (vq-f4/model.ckpt)"
)
ORIGINAL_CONFIG = typer.Option(
    None, help="the original YAML (configs/latent-diffusion/*.yaml, v1-inference.yaml); default: the family's"
)
CLIP_VOCAB = typer.Option(None, help="SD: CLIP's bpe_simple_vocab_16e6.txt.gz (default: open-clip-torch's copy)")


@app.command()
def doctor(
    params: Path = typer.Option(Path("params.yaml"), help="the params file a run would use"),
    artifacts: Path = typer.Option(Path("artifacts"), help="where the stages write their stores"),
    gpu_gb: float = typer.Option(None, help="predict for a GPU of this many GiB (present or not)"),
    host_gb: float = typer.Option(None, help="predict for this many GiB of host memory (default: this machine's)"),
    ckpt: Path | None = typer.Option(
        None, help="a CompVis .ckpt / .safetensors not imported yet: predict for the folder import-ckpt would write"
    ),
    first_stage: Path | None = FIRST_STAGE,
    config: Path | None = ORIGINAL_CONFIG,
    clip_vocab: Path | None = CLIP_VOCAB,
) -> None:
    """Check the environment before a long run: package versions, torch threads, the device, the
    model, disk space for the Zarr stores that the params imply, and each stage's predicted peak
    device memory, host memory and scratch disk, against what this machine (or --gpu-gb / --host-gb) has.
    With --ckpt, the model is that checkpoint, imported for the check into a temporary folder (its size
    in float32) that replaces the params' model section."""
    from pipeline.preflight import diagnose, diagnose_checkpoint

    # outputs are hard links into the DVC cache (.dvc/config cache.type): one copy of each store
    if ckpt is None:
        findings = diagnose(params, artifacts, copies=1, gpu_gb=gpu_gb, host_gb=host_gb)
    else:
        imports = dict(first_stage=first_stage, config=config, clip_vocab=clip_vocab)
        findings = diagnose_checkpoint(ckpt, params, artifacts, copies=1, gpu_gb=gpu_gb, host_gb=host_gb, **imports)
    for finding in findings:
        typer.echo(f"{'ok' if finding.ok else 'PROBLEM':>7}  {finding.check}: {finding.detail}")
    problems = sum(not finding.ok for finding in findings)
    if problems:
        typer.secho(f"{problems} problem(s) found", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo("no problems found")


def _records(params: Path, ablation: bool) -> tuple[list[dict], str, int | None]:
    """FP's and the configured rows' metrics records from metrics/, in the report's order, the title and
    the protocol's sample count (report.protocol_samples)."""
    from pipeline.infra.storage import read_json
    from pipeline.params import load_config
    from stages.layout import FP, metrics_path

    cfg = load_config(params, model_checks=False)  # reads records only: no model, no import of diffusers
    names = [FP, *(cfg.report.ablation if ablation else cfg.report.table)]
    missing = [name for name in names if not metrics_path(name).exists()]
    if missing:
        raise FileNotFoundError(f"no metrics for {', '.join(missing)} yet: run `python cli.py run` (dvc repro) first")
    records = [read_json(metrics_path(name)) for name in names]
    return records, "Ablation" if ablation else "Paper table", cfg.report.protocol_samples


def _table(params: Path, ablation: bool) -> str:
    """The table of metrics/ as markdown; FileNotFoundError for a missing record, ValueError for a row
    made from another FP model than metrics/fp.json's."""
    from pipeline.eval.report import ABLATION_COLUMNS, COLUMNS, markdown_table, rows_against_fp

    records, title, protocol_samples = _records(params, ablation)
    columns = ABLATION_COLUMNS if ablation else COLUMNS
    body = markdown_table(
        rows_against_fp(records), records[0]["steps"], records[0]["features"], columns, protocol_samples
    )
    return f"{title}\n\n{body}"


@app.command()
def table(
    ablation: bool = typer.Option(False, help="the ablation rows (report.ablation) instead of the paper table"),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    """Print the current table (FP first, then report.table) from the metrics in metrics/."""
    try:
        typer.echo(_table(params, ablation))
    except (FileNotFoundError, ValueError) as error:
        _fail(error)


def _documents() -> list[Path]:
    """The documents whose tables come from reports/: the README and the pages of docs/."""
    return [path for path in [Path("README.md"), *sorted(Path("docs").glob("*.md"))] if path.exists()]


@app.command()
def docs(
    check: bool = typer.Option(False, help="change nothing: list the documents that are out of date, exit 1 if any"),
) -> None:
    """Copy the tables that README.md and docs/*.md include (``<!-- include reports/... -->`` blocks)
    from the current reports/: run it after ``dvc repro``."""
    from pipeline.eval.includes import include_tables

    documents = _documents()
    stale = {}
    for path in documents:
        text = path.read_text()
        try:
            current = include_tables(text, Path("."), path)
        except (FileNotFoundError, ValueError) as error:
            _fail(error)
        if current != text:
            stale[path] = current
    if not stale:
        typer.echo(f"up to date: {', '.join(map(str, documents))}")
        return
    if check:
        _fail(f"out of date: {', '.join(map(str, stale))}; run `python cli.py docs`")
    for path, current in stale.items():
        path.write_text(current)
    typer.echo(f"rewrote {', '.join(map(str, stale))}")


@app.command("run")
def run_pipeline(
    targets: list[str] = typer.Argument(None, help="stages to bring up to date (default: all, i.e. the whole table)"),
    force: bool = typer.Option(False, help="rerun the stages even when nothing changed (dvc repro --force)"),
    warm: bool = typer.Option(True, help="fork the stages from a server that has imported torch and diffusers once"),
) -> None:
    """``dvc repro`` with a readable account: each stage's predicted peak memory when any stage is to run
    (a run that cannot fit this machine is refused before it starts), the stages it will run, progress as
    each starts, how long each took, then the table. The stages run in warm processes
    (``pipeline/infra/forkserver.py``) unless ``--no-warm``: the same results, seconds sooner each."""
    import subprocess
    import time
    from contextlib import nullcontext

    from pipeline.infra import forkserver
    from pipeline.params import load_config
    from pipeline.preflight import memory

    command = ["dvc", "repro", *(["--force"] if force else []), *(targets or [])]
    always = _always_changed()  # they run on every repro; they rerun others only when their output changes
    changed, planned = _plan(targets or [], force, always)
    # the predictions run the network on the meta device (seconds): only for a run that runs something
    findings = memory(load_config(Path("params.yaml"))) if planned else []
    for finding in findings:
        typer.echo(f"{'ok' if finding.ok else 'PROBLEM':>7}  {finding.check}: {finding.detail}")
    if not all(finding.ok for finding in findings):
        typer.secho("refused: a stage would not fit this machine (`dvc repro` runs it anyway)", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"{len(changed)} stage(s) changed: {_grouped(changed)}; up to {len(planned)} run, those downstream only "
        "if their inputs change"
        if changed
        else "everything is up to date"
    )
    started, starts, log = time.perf_counter(), {}, []
    with (
        forkserver.started() if warm and planned else nullcontext(None) as server,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server and server.env
        ) as process,
    ):
        for line in process.stdout:
            log.append(line)
            for stage in (stage for stage in _stages_in(line) if stage not in always):
                starts[stage] = time.perf_counter()
                typer.echo(f"[{len(starts)}/≤{len(planned)}] {stage} (at {starts[stage] - started:.0f} s)")
        requests = server.requests() if server else []
    ends = [*list(starts.values())[1:], time.perf_counter()]
    durations = {stage: end - start for (stage, start), end in zip(starts.items(), ends)}
    current = next(reversed(starts), None)
    if process.returncode:
        typer.echo("".join(log[-40:]), err=True)
        typer.secho(f"dvc repro failed (exit {process.returncode}) in stage {current}", fg="red", err=True)
        raise typer.Exit(process.returncode)
    for stage, seconds in sorted(durations.items(), key=lambda item: -item[1]):
        typer.echo(f"{seconds:8.1f} s  {stage}")
    typer.echo(f"{len(durations)} stage(s) ran, total {time.perf_counter() - started:.1f} s")
    if server:  # the stages that started before it had preloaded ran cold too, and asked nothing
        cold = [line for line in requests if not line.startswith("forked ")]
        typer.echo(f"{len(requests) - len(cold)} stage process(es) forked from the warm server")
        typer.echo("".join(f"  {line}\n" for line in cold), nl=False)
    if not Path("metrics").is_dir():
        return
    try:
        typer.echo(_table(Path("params.yaml"), ablation=False))
    except (FileNotFoundError, ValueError) as error:
        if not targets:
            _fail(error)
        typer.echo(f"no table: {error} (TARGETS bring only their own rows up to date)")


@app.command()
def compare(
    a: str = typer.Argument("HEAD", help="an experiment name or git revision"),
    b: str = typer.Argument(None, help="another one (default: the workspace)"),
    metric: str = typer.Option(
        "fid", help="the metric to compare (mean over seeds): fid, kid, isc, precision, recall, paired_mse"
    ),
) -> None:
    """Two experiments side by side: the params that differ, and each row's metric in both (via
    ``dvc exp diff``)."""
    import json

    diff = json.loads(_dvc_output(["dvc", "exp", "diff", "--json", "--all", a, *([b] if b else [])]) or "{}")
    changed = [
        (key, change)
        for path in diff.get("params", {}).values()
        for key, change in path.items()
        if change.get("old") != change.get("new")
    ]
    typer.echo(f"{a} → {b or 'workspace'}")
    typer.echo("params that differ:" if changed else "no params differ")
    for key, change in sorted(changed):
        typer.echo(f"  {key}: {change.get('old')} → {change.get('new')}")
    typer.echo(f"\n{'row':<22} {metric + ' ' + a:>16} {metric + ' ' + (b or 'workspace'):>16} {'change':>10}")
    for row, old, new in _metric_by_row(diff.get("metrics", {}), metric):
        change = "" if old is None or new is None else f"{new - old:+.4g}"
        typer.echo(f"{row:<22} {_number(old):>16} {_number(new):>16} {change:>10}")


def _stages_in(dvc_output: str) -> list[str]:
    """The stages that ``dvc repro`` output says it runs, in order."""
    return re.findall(r"Running stage '([^']+)'", dvc_output)


def _grouped(stages: list[str]) -> str:
    """Stage names for people: a foreach group's stages as one entry (``les@* (5)``), in order."""
    groups: dict[str, list[str]] = {}
    for stage in stages:
        groups.setdefault(stage.split("@")[0], []).append(stage)
    return ", ".join(f"{group}@* ({len(names)})" if len(names) > 1 else names[0] for group, names in groups.items())


def _plan(targets: list[str], force: bool, always: set[str]) -> tuple[list[str], set[str]]:
    """The stages ``dvc repro [--force] TARGETS`` finds changed, in the pipeline's order, and every stage it
    may reach from them. From ``dvc status``, not ``dvc repro --dry``: DVC's dry run fails as soon as a
    stage's input is one an earlier stage has yet to write (it hashes the inputs for its run cache), i.e. on
    every fresh clone."""
    import json

    dag = _dvc_output(["dvc", "dag", "--dot"])
    stages = re.findall(r'^"([^"]+)";$', dag, flags=re.MULTILINE)
    named = []
    for target in targets:  # a stage, or a foreach group (`fid`: every fid@ROW)
        matched = [stage for stage in stages if stage == target or stage.startswith(f"{target}@")]
        if not matched:
            _fail(f"no stage {target!r} in the pipeline (`dvc dag` lists them)")
        named += matched
    pipeline = _reachable(named, dag, upstream=True) if targets else set(stages)  # what the run may touch
    if force:  # --force reruns every stage of the pipeline
        found = pipeline
    else:
        status = _dvc_output(["dvc", "status", "--json", *(["--with-deps", *targets] if targets else [])])
        found = json.loads(status or "{}")  # stage name -> what changed
    changed = [stage for stage in stages if stage in found and stage not in always]
    return changed, _reachable(changed, dag) & pipeline


PIPELINE_FILES = (Path("dvc.yaml"), Path("external/dvc.yaml"))  # external: eval_files, with a lock of its own


def _dvc_output(command: list[str]) -> str:
    """The stdout of a DVC query a command reads. A failed one (e.g. another DVC process holding the
    repository's lock) stops the command, naming it: its empty output would read as "nothing to run"."""
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        _fail(f"`{' '.join(command)}` failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _always_changed(files: tuple[Path, ...] = PIPELINE_FILES) -> set[str]:
    """The stages marked ``always_changed`` (eval_files: a listing of files outside the repo), named as
    ``dvc repro`` prints them: a stage outside the root dvc.yaml after its file's path."""
    import yaml

    found = set()
    for file in files:
        stages = yaml.safe_load(file.read_text()).get("stages", {}) if file.exists() else {}
        prefix = "" if file == PIPELINE_FILES[0] else f"{file.as_posix()}:"
        found |= {prefix + name for name, spec in stages.items() if spec.get("always_changed")}
    return found


def _reachable(stages: list[str], dag_dot: str, upstream: bool = False) -> set[str]:
    """``stages`` and every stage downstream (or upstream) of them, from ``dvc dag --dot``'s edges."""
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dag_dot)
    if upstream:
        edges = [(target, source) for source, target in edges]
    found, frontier = set(stages), list(stages)
    while frontier:
        stage = frontier.pop()
        for source, target in edges:
            if source == stage and target not in found:
                found.add(target)
                frontier.append(target)
    return found


def _metric_by_row(metrics_diff: dict, metric: str) -> list[tuple[str, float | None, float | None]]:
    """(row, old, new) of one metric's mean over seeds, from ``dvc exp diff --json``'s metrics."""
    found = []
    for path, values in sorted(metrics_diff.items()):
        change = values.get(f"mean.{metric}")
        if Path(path).parent.name == "metrics" and change:
            found.append((Path(path).stem, change.get("old"), change.get("new")))
    return found


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


@app.command("import-ckpt")
def import_ckpt(
    checkpoint: Path = typer.Argument(
        ..., help="a CompVis .ckpt / .safetensors (sd-v1-4.ckpt, models/ldm/*/model.ckpt)"
    ),
    out: Path = typer.Argument(..., help="the diffusers folder to write; then model.source: local, model.path: OUT"),
    first_stage: Path | None = FIRST_STAGE,
    config: Path | None = ORIGINAL_CONFIG,
    clip_vocab: Path | None = CLIP_VOCAB,
) -> None:
    """Write a CompVis latent-diffusion / Stable Diffusion v1 checkpoint as a diffusers folder, once, offline:
    UNet, autoencoder, DDIM scheduler of its β schedule, CLIP text encoder and tokenizer or class table."""
    from pipeline.models.compvis import import_checkpoint

    if out.exists() and any(out.iterdir()):
        _fail(f"{out} exists and is not empty: name a new folder")
    try:
        layout = import_checkpoint(checkpoint, out, first_stage=first_stage, config=config, clip_vocab=clip_vocab)
    except (FileNotFoundError, ValueError) as error:
        _fail(error)
    parts = [p.name for p in (layout.unet, layout.autoencoder, layout.text_encoder, layout.tokenizer) if p]
    parts += ["class_embedding"] if layout.class_embedding else []
    typer.echo(f"{out}: {', '.join(parts)}, scheduler; use it as model.source: local, model.path: {out}")


@app.command()
def export(
    out: Path = typer.Argument(..., help="the checkpoint to write (.safetensors)"),
    row: str = typer.Option(..., help="a row of params.yaml, e.g. dmq-w4a8: its weights and activation parameters"),
    quant_seed: int | None = typer.Option(
        None, help="which quantization seed's artifacts (default: the first of quant.seeds)"
    ),
    params: Path = typer.Option(
        Path("params.yaml"), help="the params the artifacts were made with (stored in the header)"
    ),
) -> None:
    """Write one portable safetensors checkpoint of a row: packed 4-bit weights, scales, zero points, γ,
    per-step activation parameters and PTS exponents, with the params and the FP model's hash."""
    from pipeline.config import ConfigError
    from pipeline.deploy.export import export_checkpoint
    from pipeline.infra.fingerprint import model_hash
    from pipeline.params import load_config
    from stages.layout import FP_MODEL, act_params_path, weights_path

    try:
        cfg = load_config(params)
        if row not in cfg.rows:
            raise ValueError(f"no row {row!r} in {params}; rows: {', '.join(cfg.rows)}")
        seed = cfg.quant.seeds[0] if quant_seed is None else quant_seed
        if seed not in cfg.quant.seeds:
            raise ValueError(f"--quant-seed {seed}: not one of quant.seeds ({', '.join(map(str, cfg.quant.seeds))})")
        weights = weights_path(cfg.rows[row].weights, seed)
        header = export_checkpoint(
            out, weights, act_params_path(row, seed), FP_MODEL, model_hash(FP_MODEL), cfg.model_dump(mode="json")
        )
    except (ConfigError, FileNotFoundError, ValueError) as error:
        _fail(error)
    typer.echo(f"{out}: W{header['w_bits']}A{header['a_bits']}, {header['steps']} steps, {out.stat().st_size} bytes")


@app.command()
def sample(
    quantized: Path = typer.Option(..., help="a checkpoint written by `export`"),
    model: Path = typer.Option(..., help="the FP model folder it was exported from (pipeline layout or bare UNet)"),
    out: Path = typer.Option(
        Path("samples.safetensors"), help="samples in [-1, 1] (pixels); a PNG grid is written next to it"
    ),
    num_samples: int = typer.Option(16, min=1),
    batch_size: int = typer.Option(16, min=1),
    seed: int | None = typer.Option(None, help="default: the first of sample.seeds of the checkpoint's params"),
    prompts: Path | None = typer.Option(
        None, help="text-to-image models: prompts file (default: sample.prompts of the params)"
    ),
    guidance_scale: float | None = typer.Option(None, help="default: sample.guidance_scale of the params"),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    backend: str = typer.Option(
        "fake", help="fake (float32 on dequantized values) | int8 (int8 kernels, x86 CPU; see sample.backend)"
    ),
) -> None:
    """Sample from a portable checkpoint, without the DVC repository: DDIM with the steps and η the
    checkpoint was calibrated for."""
    from pipeline.deploy.export import load_checkpoint
    from pipeline.deploy.integer import to_integer
    from pipeline.eval.sampling import generate
    from pipeline.infra.device import resolve_device
    from pipeline.infra.figures import save_grid
    from pipeline.infra.storage import write_tensors
    from pipeline.models.denoiser import Decoder, load_denoiser, read_prompts
    from pipeline.models.diffusion import ddim_scheduler
    from pipeline.models.local import find_layout

    try:
        if backend not in ("fake", "int8"):
            raise ValueError(f"--backend {backend!r}: expected fake or int8")
        if backend == "int8" and resolve_device(device).type != "cpu":
            raise ValueError(f"--backend int8 runs on the CPU; pass --device cpu (got {device!r}) or --backend fake")
        loaded = load_checkpoint(quantized, model)
        unet, train_scheduler, header = loaded.unet, loaded.scheduler, loaded.headers
        if backend == "int8":
            to_integer(unet)
        s = header["config"]["sample"]
        prompt_file = prompts or s.get("prompts")
        denoiser = load_denoiser(model, unet, read_prompts(prompt_file, num_samples) if prompt_file else None)
    except (FileNotFoundError, ValueError) as error:
        _fail(error)
    run_on = resolve_device(device)
    scheduler = ddim_scheduler(train_scheduler, header["steps"])
    seed = s["seeds"][0] if seed is None else seed
    scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
    latents = generate(denoiser.to(run_on), scheduler, num_samples, batch_size, s["eta"], seed, run_on, "sample", scale)
    images = Decoder(find_layout(model), run_on)(latents)
    write_tensors(out, {"images": images}, {"checkpoint": str(quantized), "seed": seed, "guidance_scale": scale})
    grid = out.with_suffix(".png")
    save_grid(
        images, grid, max(1, int(len(images) ** 0.5)), f"{header['method']} W{header['w_bits']}A{header['a_bits']}"
    )
    typer.echo(
        f"{out}: {tuple(images.shape)}, grid {grid}; range [{float(images.min()):.3g}, {float(images.max()):.3g}]"
    )


if __name__ == "__main__":
    app()
