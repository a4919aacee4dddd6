"""``laser items add``, ``laser recommend`` and ``laser serve``: serving commands over an export bundle (no torch,
no ZenML).

Registered on the main group with :func:`register` (``laser_cli.main`` calls it).
"""

from __future__ import annotations

import json

import click


def bundle_option(help: str):
    """The ``--bundle DIR`` option of the bundle commands: an existing export bundle directory."""
    return click.option("--bundle", "bundle", required=True, type=click.Path(file_okay=False, exists=True), help=help)


def _items_group() -> click.Group:
    @click.group(name="items")
    def items() -> None:
        """Manage the item catalogue of an export bundle."""

    @items.command(name="add")
    @bundle_option("The export bundle to extend (left untouched).")
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
        from laser_core.bundle import BundleError, load_manifest
        from laser_core.serving import add_items, read_items_file

        try:
            new_items = read_items_file(items_file)
            bar = click.progressbar(
                length=len(new_items), label="embedding new items", file=click.get_text_stream("stderr")
            )
            with bar:
                out = add_items(bundle, new_items, out_dir, batch_size=batch_size, progress=bar.update)
            manifest = load_manifest(out)
        except (BundleError, ValueError, FileExistsError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"added {len(new_items)} item(s): {out} now holds {manifest.n_items} items")
        if manifest.ann_index is not None:
            click.echo(f"ANN index extended: {_ann_summary(manifest.ann_index)}")

    return items


def _ann_summary(entry) -> str:
    """One line about an ``ann_index`` section (``laser_core.bundle.AnnIndexSection``)."""
    cal = entry.calibration
    recall = f", recall@{cal.k} {cal.recall:.3f} on {cal.queries} calibration queries" if cal else ""
    return (
        f"{entry.file} ({entry.library} {entry.kind}, {entry.n_items} items, M={entry.M}, "
        f"ef_search={entry.ef_search}{recall})"
    )


def ann_index_options(f):
    """``--M``, ``--ef-construction``, ``--target-recall``, ``--ef``, ``--threads`` of an index build."""
    f = click.option("--threads", default=None, type=click.IntRange(min=1), help="Build threads (default: all).")(f)
    f = click.option(
        "--ef",
        "ef",
        default=None,
        type=click.IntRange(min=1),
        help="Search breadth to record instead of calibrating it.",
    )(f)
    f = click.option(
        "--target-recall",
        default=0.99,
        show_default=True,
        type=click.FloatRange(min=0, max=1, min_open=True),
        help="Calibrate the search breadth to this recall@k against the exact scorer.",
    )(f)
    f = click.option("--ef-construction", default=100, show_default=True, type=click.IntRange(min=1))(f)
    f = click.option(
        "--M", "m", default=16, show_default=True, type=click.IntRange(min=2, max=10000), help="HNSW graph degree."
    )(f)
    return f


def build_ann_index(bundle: str, m: int, ef_construction: int, target_recall: float, ef: int | None, threads):
    from laser_core.ann import AnnError, index_bundle
    from laser_core.serving import BundleError

    try:
        return index_bundle(
            bundle, M=m, ef_construction=ef_construction, target_recall=target_recall, ef=ef, threads=threads
        )
    except (AnnError, BundleError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


def _index_group() -> click.Group:
    @click.group(name="index")
    def index() -> None:
        """The optional approximate-nearest-neighbour index of an export bundle (large catalogues)."""

    @index.command(name="build")
    @bundle_option("The export bundle (changed in place: item_index.hnsw and the manifest's ann_index).")
    @ann_index_options
    def build(bundle: str, m: int, ef_construction: int, target_recall: float, ef: int | None, threads) -> None:
        """Build (or rebuild) an HNSW index over the bundle's item table; laser serve then uses it."""
        entry = build_ann_index(bundle, m, ef_construction, target_recall, ef, threads)
        click.echo(f"built {_ann_summary(entry)}")
        cal = entry.calibration
        if cal and not cal.reached:
            click.echo(f"warning: recall {cal.recall:.3f} is below the target {cal.target_recall}", err=True)

    return index


@click.command(name="recommend")
@bundle_option("An export bundle directory.")
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
@click.option("--exact", is_flag=True, help="Rank with the exact scorer even if the bundle has an ANN index.")
def recommend(
    bundle: str,
    history: tuple[str, ...],
    k: int | None,
    exclude_history: bool,
    popularity_fallback: bool,
    as_json: bool,
    exact: bool,
) -> None:
    """Recommend items for a history of catalogue item ids with an export bundle (onnxruntime)."""
    from laser_core.serving import BundleError, Recommender

    try:
        rec = Recommender.load(bundle, popularity_fallback=popularity_fallback, exact=exact)
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
@bundle_option("An export bundle directory (`laser export NAME:production --out DIR`).")
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
@click.option(
    "--exact",
    is_flag=True,
    help="Rank with the exact scorer (a scan of the whole table) even if the bundle has an ANN index.",
)
@click.option(
    "--scoring-threads",
    default=None,
    type=click.IntRange(min=1),
    help="Recommend requests scored at once (default: the CPU count); /health and /ready never wait for them.",
)
@click.option(
    "--max-connections",
    default=None,
    type=click.IntRange(min=1),
    help="Open connections at most (default: what the open-file limit, ulimit -n, leaves). At the limit a new "
    "connection closes the longest-idle one, or gets a 503 when none is idle.",
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a connection has to send a whole request head (408, or a quiet close if it sent nothing).",
)
@click.option(
    "--body-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request body has to arrive after its head (408).",
)
@click.option(
    "--keep-alive-timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds an idle keep-alive connection stays open.",
)
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
    exact: bool,
    scoring_threads: int | None,
    max_connections: int | None,
    header_timeout: float,
    body_timeout: float,
    keep_alive_timeout: float,
) -> None:
    """HTTP JSON service (FastAPI on uvicorn): POST /recommend {"history": [...], "k": 10}, GET /health, GET /ready,
    API docs at /docs. SIGTERM or Ctrl-C shuts it down gracefully."""
    import logging

    from laser_core.service import DEFAULT_SCORING_THREADS, ListenError, ServerSettings, bind, create_app
    from laser_core.service import serve as serve_app
    from laser_core.serving import BundleError, Recommender

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rec = Recommender.load(bundle, popularity_fallback=popularity_fallback, threads=threads, exact=exact)
        logging.getLogger("laser.serve").info(
            "scoring: %s",
            "ANN index " + _ann_summary(rec.manifest.ann_index) if rec.scoring == "ann" else "exact scorer",
        )
        app = create_app(
            rec,
            max_k=max_k,
            max_body_bytes=max_body_bytes,
            scoring_threads=scoring_threads or DEFAULT_SCORING_THREADS,
            body_timeout=body_timeout,
        )
        try:  # after the bundle is loaded: the connection limit counts the files it opened
            settings = ServerSettings(
                max_connections=max_connections,
                header_timeout=header_timeout,
                keep_alive_timeout=keep_alive_timeout,
                timeout_graceful_shutdown=graceful_timeout,
                access_log=access_log,
            ).resolved()
        except ValueError as exc:
            raise click.BadParameter(
                str(exc).replace("max_connections", "--max-connections"), param_hint="'--max-connections'"
            ) from exc
        sock = bind(host, port)  # before serving: a busy port is one clear error
    except (BundleError, ValueError, FileNotFoundError, ListenError) as exc:
        raise click.ClickException(str(exc)) from exc
    serve_app(app, sock, settings)


def register(cli: click.Group) -> None:
    """Add ``items add``, ``index build``, ``recommend`` and ``serve`` to the ``laser`` command group."""
    cli.add_command(_items_group())
    cli.add_command(_index_group())
    cli.add_command(recommend)
    cli.add_command(serve)
