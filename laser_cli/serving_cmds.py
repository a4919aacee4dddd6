"""``laser items add``, ``laser recommend`` and ``laser serve``: serving commands over an export bundle (no torch,
no ZenML).

Registered on the main group with :func:`register` (``laser_cli.main`` calls it).
"""

from __future__ import annotations

import json

import click


def _items_group() -> click.Group:
    @click.group(name="items")
    def items() -> None:
        """Manage the item catalogue of an export bundle."""

    @items.command(name="add")
    @click.option(
        "--bundle",
        "bundle",
        required=True,
        type=click.Path(file_okay=False, exists=True),
        help="The export bundle to extend (left untouched).",
    )
    @click.option(
        "--items",
        "items_file",
        required=True,
        type=click.Path(dir_okay=False, exists=True),
        help="New items: .csv, .parquet or .jsonl with item_id, title[, brand, category].",
    )
    @click.option(
        "--out",
        "out_dir",
        required=True,
        type=click.Path(file_okay=False),
        help="Directory for the new bundle (absent or empty).",
    )
    @click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
    def add(bundle: str, items_file: str, out_dir: str, batch_size: int) -> None:
        """Add cold-start items (embedded from their text, no retraining) into a new bundle."""
        from laser_core.bundle import BundleError, read_manifest
        from laser_core.serving import add_items, read_items_file

        try:
            new_items = read_items_file(items_file)
            out = add_items(bundle, new_items, out_dir, batch_size=batch_size)
            manifest = read_manifest(out)
        except (BundleError, ValueError, FileExistsError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"added {len(new_items)} item(s): {out} now holds {manifest['n_items']} items")

    return items


@click.command(name="recommend")
@click.option(
    "--bundle",
    "bundle",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="An export bundle directory.",
)
@click.option(
    "--history",
    "history",
    multiple=True,
    metavar="ITEM_ID",
    help="A history item id, oldest first; repeat the option for each item.",
)
@click.option("-k", "k", type=click.IntRange(min=1), default=None, help="Number of items (default: the bundle's k).")
@click.option("--exclude-history", is_flag=True, help="Leave the history's items out of the results.")
@click.option(
    "--popularity-fallback",
    is_flag=True,
    help="Answer an empty or all-unknown history with the most popular items instead of failing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def recommend(
    bundle: str,
    history: tuple[str, ...],
    k: int | None,
    exclude_history: bool,
    popularity_fallback: bool,
    as_json: bool,
) -> None:
    """Recommend items for a history of catalogue item ids with an export bundle (onnxruntime)."""
    from laser_core.serving import BundleError, Recommender

    try:
        rec = Recommender.load(bundle, popularity_fallback=popularity_fallback)
        result = rec.recommend(list(history), k=k, exclude_history=exclude_history)
    except (BundleError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if result.dropped:
        click.echo(f"dropped unknown item id(s): {', '.join(result.dropped)}", err=True)
    if result.fallback:
        click.echo(f"no known item in the history: {result.fallback} fallback", err=True)
    click.echo(f"model {result.model_version}")
    for item in result.items:
        click.echo(f"{item.rank:>3}  {item.score:8.4f}  {item.item_id:<16} {item.title}")


@click.command(name="serve")
@click.option(
    "--bundle",
    "bundle",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="An export bundle directory (`laser export NAME:production --out DIR`).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(min=0, max=65535),
    help="0: any free port (the log line names it).",
)
@click.option(
    "--max-k",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="The largest k a request may ask for (also capped at the catalogue size).",
)
@click.option(
    "--max-body-bytes",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Larger request bodies get a 413.",
)
@click.option(
    "--popularity-fallback",
    is_flag=True,
    help="Answer an empty or all-unknown history with the most popular items instead of a 422.",
)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@click.option(
    "--graceful-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds requests in flight get to finish after SIGTERM or Ctrl-C.",
)
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
def serve(
    bundle: str,
    host: str,
    port: int,
    max_k: int,
    max_body_bytes: int,
    popularity_fallback: bool,
    threads: int | None,
    graceful_timeout: float,
    access_log: bool,
) -> None:
    """HTTP JSON service (FastAPI on uvicorn): POST /recommend {"history": [...], "k": 10}, GET /health, GET /ready,
    API docs at /docs. SIGTERM or Ctrl-C shuts it down gracefully."""
    import logging

    from laser_core.service import ListenError, bind, create_app, serve as serve_app
    from laser_core.serving import BundleError, Recommender

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rec = Recommender.load(bundle, popularity_fallback=popularity_fallback, threads=threads)
        app = create_app(rec, max_k=max_k, max_body_bytes=max_body_bytes)
        sock = bind(host, port)  # before serving: a busy port is one clear error
    except (BundleError, ValueError, FileNotFoundError, ListenError) as exc:
        raise click.ClickException(str(exc)) from exc
    serve_app(app, sock, timeout_graceful_shutdown=graceful_timeout, access_log=access_log)


def register(cli: click.Group) -> None:
    """Add ``items add``, ``recommend`` and ``serve`` to the ``laser`` command group."""
    cli.add_command(_items_group())
    cli.add_command(recommend)
    cli.add_command(serve)
