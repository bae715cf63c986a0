"""The `grainflow` command.

User mistakes (bad URI, missing metadata, unknown names) print one readable line and
exit with status 2; anything else is a bug and keeps its traceback.

Text that comes from data (instrument metadata, catalog cells, names, paths, error
messages quoting them) is printed through `_shown`: control characters appear as
visible escapes and rich markup is escaped, so a file's tags cannot drive the terminal.
"""

from __future__ import annotations

import json
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from engine.errors import GrainflowError, printable, user_error_message

app = typer.Typer(
    name="grainflow",
    help="Turn archives of micrographs into measurements.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped output (CI logs, notebooks) gets a wide fixed width rather than rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


# The control characters (`engine.errors.printable`) json.dumps writes raw: it escapes C0 ones itself.
_RAW_IN_JSON = re.compile(r"[\x7f-\x9f]")


def _shown(text: object, *, newlines: bool = False) -> str:
    """`str(text)`, data rather than markup, ready for `console.print`: control
    characters written as visible escapes (`engine.errors.printable`: instrument files put
    any text they like in their tags), then rich markup escaped, so "[as-built]" is
    printed as written rather than read as a tag."""
    return escape(printable(text, newlines=newlines))


def _print_json(text: str) -> None:
    """The JSON document `text`, indented (and coloured on a terminal) as
    `console.print_json` prints it, with DEL and C1 controls written as \\u escapes:
    print_json writes them raw. The JSON read back is the same."""
    dumped = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    rendered = JSONHighlighter()(_RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped))
    rendered.no_wrap, rendered.overflow = True, None
    console.print(rendered, soft_wrap=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=errors, transient=False,
    )


@app.command()
def synth(
    out: str = typer.Argument(..., help="Archive to write: local path, file:// or s3:// URI."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an existing archive: the images its catalog lists and the catalog "
                                        "are deleted first; other files in the folder are kept."),
    images: int = typer.Option(12, "--images", "-n", min=1, help="Number of images."),
    seed: int = typer.Option(0, help="Seed; the same seed writes the same bytes."),
    size: int = typer.Option(512, help="Image height and width in pixels."),
    chunk: int = typer.Option(512, help="Zarr chunk edge in pixels."),
    material: Optional[list[str]] = typer.Option(None, "--material", "-m", help="Only these materials (repeatable)."),
    modality: Optional[list[str]] = typer.Option(None, "--modality", help="Only these modalities (repeatable)."),
) -> None:
    """Generate a procedural micrograph archive with ground truth."""
    from engine.errors import MetadataError
    from engine.stores.catalog import CATALOG_FILE, remove_catalogued_images
    from engine.stores.uri import durable
    from engine.synth.archive import generate_archive, plan_archive

    location = durable(out, "archive")
    replacing = location.join(CATALOG_FILE).exists()
    if replacing and not overwrite:
        raise GrainflowError(f"{location}: already an archive (it has a {CATALOG_FILE}); synth writes a new catalog "
                             f"and ground truth, so its images would no longer be listed: give a new folder, or "
                             f"--overwrite to replace them")

    plans = plan_archive(n_images=images, seed=seed, size=size, chunk=chunk, materials=material, modalities=modality)
    if replacing:  # only once the arguments are known good: a typo must not cost the old archive
        try:
            remove_catalogued_images(location)
        except MetadataError as exc:
            raise GrainflowError(f"{exc}; --overwrite deletes the images the old catalog lists, so it cannot go on: "
                                 f"delete the archive yourself or give a new folder") from None
    with _progress() as progress:
        task = progress.add_task("synthesising", total=sum(p.n_chunks for p in plans))
        catalog = generate_archive(
            out, n_images=images, seed=seed, size=size, chunk=chunk, materials=material, modalities=modality,
            progress=lambda n: progress.advance(task, n),
        )
    console.print(f"wrote {len(catalog)} images to [bold]{_shown(out)}[/bold]")
    _print_summary(catalog)


@app.command()
def ingest(
    files: list[Path] = typer.Argument(..., help="Instrument files (TIFF, DM3/DM4, EMD) or OME-Zarr image folders (NGFF v0.4/v0.5)."),
    archive: str = typer.Option(..., "--archive", "-a", help="Archive to add the images to."),
    pixel_size: Optional[float] = typer.Option(None, help="Pixel size of level 0; needed where a file carries none, and overrides the file's own."),
    unit: str = typer.Option("nanometer", help="Unit of --pixel-size (nm, um, ...)."),
    modality: Optional[str] = typer.Option(None, help="SEM, TEM or optical; needed where a file does not say, and overrides the file's own."),
    material: Optional[str] = typer.Option(None, help="Material label for every file."),
    chunk: int = typer.Option(512, help="Zarr chunk edge in pixels."),
) -> None:
    """Convert instrument files and existing OME-Zarr images into an archive's images and add them to its catalog."""
    from engine.stores.ingest import ingest_files
    from engine.stores.uri import durable

    durable(archive, "--archive")

    with _progress() as progress:
        task = progress.add_task("ingesting", total=len(files))
        rows = ingest_files(
            files, archive, pixel_size=pixel_size, unit=unit if pixel_size is not None else None,
            modality=modality, material=material, chunk=chunk, progress=lambda n=1: progress.advance(task, n),
        )
    console.print(f"ingested {len(rows)} images from {len(files)} files into [bold]{_shown(archive)}[/bold]")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Fine-tune a model on an archive (the arguments of `python -m jobs.finetune`; see --help)."""
    from jobs.finetune import main as finetune

    raise typer.Exit(finetune(list(ctx.args)))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def reprocess(ctx: typer.Context) -> None:
    """Run the ensemble over every tile of an archive (the arguments of `python -m jobs.reprocess`; see --help)."""
    from jobs.reprocess import main as reprocess_main

    raise typer.Exit(reprocess_main(list(ctx.args)))


@app.command()
def catalog(
    archive: str = typer.Argument(..., help="Archive URI."),
    image: Optional[str] = typer.Option(None, "--image", "-i", help="Describe one image in detail."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """List and describe the images of an archive."""
    from engine.stores.catalog import image_uri, read_catalog
    from engine.stores.image import open_image
    from engine.stores.uri import resolve

    df = read_catalog(archive)
    if image is None:
        if as_json:
            _print_json(df.to_json(orient="records", date_format="iso"))
        else:
            _print_catalog(df)
            _print_summary(df)
        return
    if image not in set(df.image_id):
        raise GrainflowError(f"{archive}: no image {image!r} in the catalog")
    img = open_image(image_uri(resolve(archive), image))
    levels = [
        {"level": lv.index, "shape": lv.shape, "chunks": lv.chunks, "pixel_size": lv.pixel_size} for lv in img.levels
    ]
    info = {"image_id": image, "uri": img.uri, "ngff": img.multiscale.version, "dtype": img.dtype,
            "unit": img.unit, "labels": img.labels(), "attributes": img.attributes, "levels": levels}
    if as_json:
        _print_json(json.dumps(info, default=str))
        return
    # catalog and metadata text is the user's data, not rich markup or terminal controls:
    # "[as-built]" would vanish as an unknown tag, "[/HIP]" raise MarkupError, and a
    # TIFF tag's ESC sequences drive the terminal (_shown)
    labels = ", ".join(img.labels()) or "none"
    table = Table(title=_shown(f"{image}  ({img.dtype}, NGFF {img.multiscale.version}, labels: {labels})"))
    for col in ("level", "shape (y, x)", "chunks", _shown(f"pixel size ({img.unit})")):
        table.add_column(col)
    for lv in levels:
        table.add_row(str(lv["level"]), f"{lv['shape'][0]} x {lv['shape'][1]}", f"{lv['chunks'][0]} x {lv['chunks'][1]}",
                      f"{lv['pixel_size'][0]:.6g} x {lv['pixel_size'][1]:.6g}")
    console.print(table)
    for key, value in img.attributes.items():
        console.print(f"  {_shown(key)}: {_shown(value)}")


def _print_catalog(df) -> None:
    """One table row per catalog row; every cell through `_shown`, as catalog text is data."""
    table = Table(title=f"{len(df)} images")
    for col in ("image_id", "modality", "material", "grade", "shape (y x x)", "dtype", "pixel size (y x x)"):
        table.add_column(col)
    for row in df.itertuples():
        table.add_row(*(_shown(cell) for cell in (
            row.image_id, row.modality, _text(row.material), _text(row.quality_grade),
            f"{row.height} x {row.width}", row.dtype, _pixel_size(row.pixel_size_y, row.pixel_size_x, row.unit),
        )))
    console.print(table)


def _pixel_size(size_y: float, size_x: float, unit: str) -> str:
    """A catalog row's level-0 pixel size: "100 nm", or "200 x 100 nm" (y x x, as the
    shape column) when the two differ at the digits shown."""
    y, x = f"{size_y:.4g}", f"{size_x:.4g}"
    return f"{x} {_unit_symbol(unit)}" if y == x else f"{y} x {x} {_unit_symbol(unit)}"


def _print_summary(df) -> None:
    megapixels = float((df.height * df.width).sum()) / 1e6
    console.print(f"{len(df)} images, {megapixels:.1f} megapixels at level 0")
    for col in ("modality", "material"):
        counts = df[col].fillna("-").value_counts().sort_index()
        console.print(f"  {col}: " + ", ".join(f"{_shown(k)} {v}" for k, v in counts.items()))


def _text(value) -> str:
    return "-" if value is None or value != value else str(value)


def _unit_symbol(unit: str) -> str:
    return {"nanometer": "nm", "micrometer": "µm", "angstrom": "Å", "millimeter": "mm"}.get(unit, unit)


class Alias(str, Enum):
    """The aliases serving splits traffic between (engine.serving.config); a typo such as
    `prod` would otherwise make an alias nothing reads."""

    production = "production"
    canary = "canary"


registry_app = typer.Typer(
    help="Registered models and the aliases jobs and `grainflow serve` read (NAME@production, NAME@canary).",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")

_TRACKING_URI_HELP = "Model registry (default: MLFLOW_TRACKING_URI, else the user data dir's); a named one must exist."


def _alias_option():
    return typer.Option(Alias.production, "--alias",
                        help="Alias to move (canary's traffic share is the serve config's split).")


def _open_registry(tracking_uri: Optional[str]):
    """The registry named by `tracking_uri` (or MLFLOW_TRACKING_URI), refused when it does
    not exist: opening a SQLite URI would create an empty one, and a mistyped path would
    then answer "no registered model"."""
    from engine.registry import ModelRegistry
    from engine.registry.backend import check_existing

    check_existing(tracking_uri)
    return ModelRegistry(tracking_uri)


@registry_app.command("list")
def registry_list(
    tracking_uri: Optional[str] = typer.Option(None, help=_TRACKING_URI_HELP),
) -> None:
    """List registered models and bundles: each version, its family and the aliases on it."""
    registry = _open_registry(tracking_uri)
    names = registry.list_models()
    if not names:
        console.print(f"no registered models in {_shown(registry.tracking_uri)}", highlight=False)
        return
    table = Table(title=f"{len(names)} registered models in {_shown(registry.tracking_uri)}")
    for col in ("name", "version", "family", "aliases"):
        table.add_column(col)
    for name in names:
        for mv in registry.versions(name):
            family = mv.family if mv.family is not None else "(not grainflow's)"  # another tool registered it
            table.add_row(_shown(name), str(mv.version), _shown(family), _shown(", ".join(mv.aliases)) or "-")
    console.print(table)


@registry_app.command("promote")
def registry_promote(
    name: str = typer.Argument(..., help="Registered model or bundle name."),
    version: int = typer.Argument(..., min=1, help="Version to point the alias at."),
    alias: Alias = _alias_option(),
    tracking_uri: Optional[str] = typer.Option(None, help=_TRACKING_URI_HELP),
) -> None:
    """Point NAME@ALIAS at VERSION (the move is recorded, so `rollback` can undo it)."""
    mv = _open_registry(tracking_uri).promote(name, version, alias.value)
    console.print(f"{_shown(name)}@{alias.value} -> {_shown(mv.ref)}", highlight=False)


@registry_app.command("rollback")
def registry_rollback(
    name: str = typer.Argument(..., help="Registered model or bundle name."),
    alias: Alias = _alias_option(),
    tracking_uri: Optional[str] = typer.Option(None, help=_TRACKING_URI_HELP),
) -> None:
    """Move NAME@ALIAS back to the version it pointed at before its latest move (run it
    again to go further back)."""
    mv = _open_registry(tracking_uri).rollback(name, alias.value)
    console.print(f"{_shown(name)}@{alias.value} -> {_shown(mv.ref)}", highlight=False)


@registry_app.command("fetch")
def registry_fetch(
    ref: str = typer.Argument(..., help="NAME, NAME@ALIAS or NAME/VERSION."),
    dest: Optional[Path] = typer.Option(None, help="Folder for the files (default: the user cache's copy)."),
    tracking_uri: Optional[str] = typer.Option(None, help=_TRACKING_URI_HELP),
) -> None:
    """Copy a registered version's files to DEST, each checked against the sha256 recorded
    when it was registered, and print their paths (e.g. a detector to fine-tune from:
    `grainflow train --init-weights PATH`)."""
    registry = _open_registry(tracking_uri)
    mv = registry.get(ref)
    for name, path in registry.fetch(mv, dest).items():
        console.print(f"{_shown(mv.ref)}  {mv.sha256[name]}  {_shown(path)}", highlight=False, soft_wrap=True)


def _register_commands() -> None:
    """Commands that live beside the code they drive: each module's register(app)."""
    from engine.reports.cli import register as register_report
    from engine.serving.cli import register as register_serve
    from engine.submit_cli import register as register_submit
    from engine.synth.diffusion.cli import register as register_synthesize

    for register in (register_report, register_serve, register_synthesize, register_submit):
        register(app)


_register_commands()


def main() -> None:
    from engine.runtime import configure_offline

    configure_offline()
    try:
        app()
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:  # a bug: its traceback
            raise
        errors.print(f"[bold red]error:[/bold red] {_shown(message, newlines=True)}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
