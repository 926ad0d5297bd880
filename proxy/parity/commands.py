"""``strangler parity sql|http|last``: thin wrappers over the runner, the walker and the store.

Exit codes: 0 every table equal, 1 differences found, 2 an error (bad config, unreachable
database or API, a missing column). Progress goes to stderr, the verdict to stdout.

Light on purpose: `strangler parity` imports this module and what its command needs, nothing of
the proxy (``proxy.cliutil`` and Redis come in only to store or read results in Redis).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand

from proxy.parity.report import TableResult, exit_code, rich_table, sample_lines, to_json, to_markdown

ReportOpt = Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")]
MarkdownOpt = Annotated[Path | None, typer.Option("--markdown", help="Write a Markdown report here.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report instead of a table.")]
QpsOpt = Annotated[
    float | None, typer.Option("--max-qps", help="At most this many queries/requests per second.")
]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Sample rows kept per kind of difference.")]
RedisOpt = Annotated[
    str | None,
    typer.Option("--redis-url", help="Store the result here (default: settings or embedded Redis)."),
]
SettingsOpt = Annotated[
    Path | None, typer.Option("--settings", help="Strangler settings file (for Redis URL and key prefix).")
]
NoStoreOpt = Annotated[bool, typer.Option("--no-store", help="Do not store the result in Redis.")]


class _PlainValue:
    """An option's value as ``str``, ``int``, ``float`` or ``Path``, by calling the type; a flag's
    as it is. typer 0.29 coerces every option, the help flag included, through a pydantic
    TypeAdapter: importing pydantic for that costs `parity sql` about 12 MB of its peak, and the
    adapters 4 more (a run on a million rows needs 31 MB in all, as much as reladiff), for checks
    it does not need: every value is checked again where it is used (the config loader, the
    checkpoint, the report paths)."""

    def __init__(self, kind: Callable[[Any], Any] | None) -> None:
        self.kind = kind

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:  # typer's runtime-parameter call
        if value is None:
            return () if param.multiple else None
        if param.multiple:
            return [self._one(item, param, ctx) for item in value]
        return self._one(value, param, ctx)

    def _one(self, value: Any, param: Any, ctx: Any) -> Any:
        if self.kind is None:
            return value
        try:
            return self.kind(value)
        except (TypeError, ValueError):
            name = "number" if self.kind in (int, float) else "value"
            raise typer.BadParameter(f"{value!r} is not a {name}", ctx=ctx, param=param) from None


_PLAIN: dict[Any, Callable[[Any], Any] | None] = {
    str: str, int: int, float: float, Path: Path, list[str]: str, bool: None
}  # fmt: skip


def _plain(param: Any) -> Any:
    """Give ``param`` plain coercion when its type is one of ours (else typer keeps its own)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if param is not None and hasattr(param, "get_runtime_param") and annotation in _PLAIN:
        plain = _PlainValue(_PLAIN[annotation])
        param.get_runtime_param = lambda: plain
    return param


class LightCommand(TyperCommand):
    """A typer command whose options (and help flag) skip typer's pydantic coercion (the groups
    above it have theirs set to False when not given: proxy/cli.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain(param)

    def get_help_option(self, ctx: Any) -> Any:
        return _plain(super().get_help_option(ctx))


parity_app = typer.Typer(
    no_args_is_help=True,
    help="Prove the new data store holds the same data as the old one (SQL, HTTP).",
)

EXIT_ERROR = 2  # proxy.cliutil's EXIT_USAGE: 1 means "different" here
_consoles: dict[str, Any] = {}


def _console(stderr: bool = False) -> Any:
    """rich's console for stdout or stderr, loaded on first use (a ``--json`` run never needs it)."""
    name = "err" if stderr else "out"
    if name not in _consoles:
        from rich.console import Console

        _consoles[name] = Console(stderr=True, soft_wrap=True) if stderr else Console()
    return _consoles[name]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _run_async(coroutine: Any) -> Any:
    import asyncio  # only for Redis and HTTP: `parity sql` has no event loop

    return asyncio.run(coroutine)


def _fail(message: str) -> NoReturn:
    """Exit code 2, whatever went wrong, as one line (as ``proxy.cliutil.fail`` writes it)."""
    _console(stderr=True).print(f"[red]error:[/red] {_escape(' '.join(message.split()))}", soft_wrap=True)
    raise typer.Exit(EXIT_ERROR)


def _keys_and_url(
    settings_path: Path | None, redis_url: str | None, required: bool
) -> tuple[Any, str | None]:
    from proxy.cliutil import settings_from
    from proxy.control.embedded import read_url
    from proxy.control.keys import Keys

    settings = settings_from(settings_path, redis_url=redis_url)
    keys = Keys.for_settings(settings)
    url = settings.redis_url or read_url(settings.embedded_redis_dir)
    if url is None and required:
        _fail("no Redis to read: pass --redis-url or start `strangler serve`")
    return keys, url


def _store(results: list[TableResult], kind: str, settings_path: Path | None, redis_url: str | None) -> None:
    """Best effort: a parity verdict is still worth its exit code when Redis is away."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from proxy.parity.store import store_results

    keys, url = _keys_and_url(settings_path, redis_url, required=False)
    if url is None:
        _console(stderr=True).print(
            "note: no Redis configured or running; result not stored (--redis-url to store it)"
        )
        return

    async def go() -> None:
        client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            await store_results(client, keys, results, kind)
        finally:
            await client.aclose()

    try:
        _run_async(go())
    except (RedisError, OSError) as exc:
        _console(stderr=True).print(
            f"[yellow]warning:[/yellow] result not stored in Redis: {_escape(str(exc))}"
        )


def _guarded(run: Callable[[], list[TableResult]]) -> list[TableResult]:
    """Whatever goes wrong inside is exit code 2, never Python's 1 (which means "different")."""
    try:
        return run()
    except (KeyboardInterrupt, typer.Exit):
        raise
    except Exception as exc:  # noqa: BLE001 - the exit-code contract's boundary
        _fail(f"parity stopped: {type(exc).__name__}: {exc}")


def _finish(
    results: list[TableResult], kind: str, as_json: bool, report: Path | None, markdown: Path | None
) -> int:
    text = to_json(results, kind)
    if report is not None:
        report.write_text(text)
    if markdown is not None:
        markdown.write_text(to_markdown(results, kind))
    if as_json:
        print(text)
    else:
        _console().print(rich_table(results, kind))
        for result in results:
            shown = sample_lines(result, limit=5)
            if shown:
                _console().print(
                    f"[bold]{_escape(result.table)}[/bold] (first samples; --report for all kept):"
                )
                for line in shown:
                    _console().print(f"  {_escape(line)}", highlight=False)
        for result in results:
            if result.error:
                _console(stderr=True).print(
                    f"[red]error:[/red] {_escape(result.table)}: {_escape(result.error)}"
                )
    return exit_code(results)


@parity_app.command("sql", cls=LightCommand)
def parity_sql(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="parity.yaml: databases and table mappings.")
    ],
    lag: Annotated[
        str | None, typer.Option("--lag", help="Re-check differences after this window (e.g. 30s).")
    ] = None,
    max_qps: QpsOpt = None,
    table: Annotated[
        list[str] | None, typer.Option("--table", "-t", help="Only this table (repeatable).")
    ] = None,
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", help="Progress file, written after every chunk.")
    ] = Path(".strangler/parity-checkpoint.json"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint.")] = False,
    samples: SamplesOpt = 20,
    report: ReportOpt = None,
    markdown: MarkdownOpt = None,
    as_json: JsonOpt = False,
    redis_url: RedisOpt = None,
    settings: SettingsOpt = None,
    no_store: NoStoreOpt = False,
) -> None:
    """Compare tables of two databases: counts, segment checksums, then only the differing rows."""
    from proxy.parity.checkpoint import Checkpoint, CheckpointError, fingerprint
    from proxy.parity.config import ParityConfigError, load_config, parse_duration
    from proxy.parity.runner import Runner, RunOptions  # the database drivers load when a run opens them

    try:
        overrides: dict[str, Any] = {"max_qps": max_qps}
        if lag is not None:
            overrides["lag_seconds"] = parse_duration(lag)
        parsed = load_config(config, **overrides)
        known = {t.name for t in parsed.tables}
        for name in table or []:
            if name not in known:
                raise ParityConfigError(
                    f"unknown table {name!r}; configured: {', '.join(sorted(map(str, known)))}"
                )
        state = Checkpoint(checkpoint, fingerprint(parsed), resume)
    except (ParityConfigError, CheckpointError, ValueError) as exc:
        _fail(str(exc))
    options = RunOptions(samples=samples, tables=list(table or []))
    if not sys.stderr.isatty():  # cron, CI, a pipe: no bar to draw (and rich.progress not loaded)
        results = _guarded(lambda: Runner(parsed, state, options).run())
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=_console(stderr=True), transient=True,
        ) as progress:  # fmt: skip
            tasks: dict[str, Any] = {}

            def show(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = progress.add_task(f"{name} chunks", total=total)
                progress.update(tasks[name], completed=done, total=total)

            options.progress = show
            results = _guarded(lambda: Runner(parsed, state, options).run())
    if exit_code(results) != 2 and checkpoint.exists():
        checkpoint.unlink()  # finished: a later --resume starts afresh
    if not no_store:
        _store(results, "sql", settings, redis_url)
    raise typer.Exit(_finish(results, "sql", as_json, report, markdown))


@parity_app.command("http")
def parity_http(
    v1: Annotated[str, typer.Option("--v1", help="Old API base URL.")],
    v2: Annotated[str, typer.Option("--v2", help="New API base URL.")],
    path: Annotated[str, typer.Option("--path", help="List endpoint, e.g. /items.")],
    paginate: Annotated[str, typer.Option("--paginate", help="cursor, page, offset or none.")] = "cursor",
    items_path: Annotated[
        str, typer.Option("--items-path", help="Where the list is ('' = the body).")
    ] = "items",
    id_path: Annotated[str, typer.Option("--id-path", help="Record id, dotted path.")] = "id",
    next_path: Annotated[str, typer.Option("--next-path", help="Next cursor in the body.")] = "next_cursor",
    cursor_param: Annotated[str, typer.Option("--cursor-param")] = "cursor",
    page_param: Annotated[str, typer.Option("--page-param")] = "page",
    first_page: Annotated[int, typer.Option("--first-page")] = 1,
    offset_param: Annotated[str, typer.Option("--offset-param")] = "offset",
    limit_param: Annotated[str, typer.Option("--limit-param")] = "limit",
    page_size: Annotated[int, typer.Option("--page-size")] = 100,
    item_path: Annotated[
        str | None, typer.Option("--item-path", help="Single record, e.g. /items/{id} (for --sample).")
    ] = None,
    sample: Annotated[int, typer.Option("--sample", help="Spot-check this many ids with GET item-path.")] = 0,
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="'Name: value' sent to both (repeatable).")
    ] = None,
    max_qps: QpsOpt = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Spot checks in flight.")] = 4,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="deepdiff path to ignore.")] = None,
    exclude_regex: Annotated[list[str] | None, typer.Option("--exclude-regex")] = None,
    ignore_order: Annotated[bool, typer.Option("--ignore-order")] = False,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Numbers closer than this are equal.")
    ] = 0.0,
    shadow_rules: Annotated[
        bool, typer.Option("--shadow-rules", help="Also apply the live shadow ignore rules (from Redis).")
    ] = False,
    samples: SamplesOpt = 20,
    report: ReportOpt = None,
    markdown: MarkdownOpt = None,
    as_json: JsonOpt = False,
    redis_url: RedisOpt = None,
    settings: SettingsOpt = None,
    no_store: NoStoreOpt = False,
) -> None:
    """Compare the v1 and v2 list endpoints record by record (and sampled single records)."""
    import re
    from urllib.parse import urlsplit

    from proxy.parity.http import HttpOptions, Walker

    headers: dict[str, str] = {}
    try:
        for flag, url in (("--v1", v1), ("--v2", v2)):  # checked here: the walk would name only the path
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{flag}: {url!r} is not an http:// or https:// URL with a host")
        if not path.startswith("/"):
            raise ValueError(f"--path: {path!r} must start with /")
        for item in header or []:
            name, sep, value = item.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"header {name.strip()!r} is not 'Name: value'")
            headers[name.strip()] = value.strip()
        for pattern in exclude_regex or []:
            re.compile(pattern)
        options = HttpOptions(
            v1=v1, v2=v2, path=path, paginate=paginate, items_path=items_path or None, id_path=id_path,
            next_path=next_path, cursor_param=cursor_param, page_param=page_param, first_page=first_page,
            offset_param=offset_param, limit_param=limit_param, page_size=page_size, item_path=item_path,
            sample=sample, headers=headers, max_qps=max_qps, concurrency=max(1, concurrency),
            exclude_paths=tuple(exclude or ()), exclude_regex=tuple(exclude_regex or ()),
            ignore_order=ignore_order, tolerance=tolerance, samples=samples,
        )  # fmt: skip
    except (ValueError, re.error) as exc:
        _fail(str(exc))
    if shadow_rules:
        options.shadow_rules = _shadow_rules(settings, redis_url)
    with _console(stderr=True).status("walking v1 and v2") as status:

        def show(version: str, records: int) -> None:
            status.update(f"walking {path}: {version} {records} records")

        results = _guarded(lambda: _run_async(Walker(options, show).run()))
    if not no_store:
        _store(results, "http", settings, redis_url)
    raise typer.Exit(_finish(results, "http", as_json, report, markdown))


def _shadow_rules(settings_path: Path | None, redis_url: str | None) -> tuple[Any, ...]:
    """The rule set the proxies compare with: config rules plus the live ones in Redis."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from proxy.cliutil import settings_from
    from proxy.control.client import ControlClient
    from proxy.shadow.policy import RULES_SECTION, make_rules_parser

    keys, url = _keys_and_url(settings_path, redis_url, required=True)
    assert url is not None
    settings = settings_from(settings_path, redis_url=redis_url)

    async def go() -> dict[str, str]:
        client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return await ControlClient(client, keys).get_hash(RULES_SECTION)
        finally:
            await client.aclose()

    try:
        raw = _run_async(go())
    except (RedisError, OSError) as exc:
        _fail(f"cannot read the shadow rules: Redis is unreachable ({exc})")
    ruleset, problems = make_rules_parser(settings)(raw, None)
    for problem in problems:
        _console(stderr=True).print(f"[yellow]warning:[/yellow] shadow rule skipped: {_escape(problem)}")
    return tuple(ruleset.rules)


@parity_app.command("last")
def parity_last(redis_url: RedisOpt = None, settings: SettingsOpt = None, as_json: JsonOpt = False) -> None:
    """The last parity result per table, as stored in Redis."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
    from rich.table import Table

    from proxy.parity.store import read_last_results

    keys, url = _keys_and_url(settings, redis_url, required=True)
    assert url is not None

    async def go() -> dict[str, dict[str, Any]]:
        client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return await read_last_results(client, keys)
        finally:
            await client.aclose()

    try:
        last = _run_async(go())
    except (RedisError, OSError) as exc:
        _fail(f"Redis is unreachable: {exc}")
    if as_json:
        print(json.dumps(last))
        return
    table = Table(title="last parity result per table")
    for column in ("table", "kind", "status", "missing", "extra", "changed", "seconds"):
        table.add_column(column)
    for name, data in last.items():
        table.add_row(
            _escape(name), str(data.get("kind")), str(data.get("status")), str(data.get("missing")),
            str(data.get("extra")), str(data.get("changed")), str(data.get("seconds")),
        )  # fmt: skip
    _console().print(table)
