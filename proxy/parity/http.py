"""``strangler parity http``: the v1 and v2 list endpoints walked page by page, record by record.

Records are keyed by an id path and compared with the shadow diff engine (deepdiff, the same
ignore rules: exact paths, regexes, order, numeric tolerance). Pagination styles: ``cursor`` (the
next cursor is read from the body), ``page`` (page=1,2,...) and ``offset`` (offset=0,N,...); a
page with fewer records than the page size, or no next cursor, ends the walk. ``--sample N`` also
fetches ``GET <item path>`` on both sides for N ids and compares the whole answers.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import orjson

from proxy.parity.errors import ParityError
from proxy.parity.normalise import display
from proxy.parity.report import DIFFERENT, EQUAL, ERROR, TableResult
from proxy.parity.throttle import Throttle
from proxy.shadow.compare import Answer, differences
from proxy.shadow.policy import ALL_ENDPOINTS, EndpointRules, Rule, RuleSet, make_rule

STYLES = ("cursor", "page", "offset", "none")
T = TypeVar("T")


@dataclass(slots=True)
class HttpOptions:
    v1: str
    v2: str
    path: str
    paginate: str = "cursor"
    items_path: str | None = "items"  # dotted; None: the body is the list
    id_path: str = "id"
    cursor_param: str = "cursor"
    next_path: str = "next_cursor"
    page_param: str = "page"
    first_page: int = 1
    offset_param: str = "offset"
    limit_param: str = "limit"
    page_size: int = 100
    item_path: str | None = None  # e.g. /items/{id}
    sample: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    max_qps: float | None = None
    concurrency: int = 4
    timeout: float = 30.0
    max_pages: int = 1_000_000
    exclude_paths: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()
    ignore_order: bool = False
    tolerance: float = 0.0
    samples: int = 20
    seed: int = 0
    shadow_rules: tuple[Rule, ...] = ()  # the live shadow ignore rules (--shadow-rules)

    def __post_init__(self) -> None:
        if self.paginate not in STYLES:
            raise ValueError(f"pagination must be one of {', '.join(STYLES)}")
        if self.page_size < 1:
            raise ValueError("page size must be at least 1")
        if self.sample and not self.item_path:
            raise ValueError("--sample needs --item-path (e.g. /items/{id})")
        if self.item_path and "{id}" not in self.item_path:
            raise ValueError("--item-path must contain {id}")
        self._own_rules()  # a bad path or regex is refused before anything is fetched

    def _own_rules(self) -> list[Rule]:
        """The command-line rules, for every endpoint; validated as shadow rules are (ValueError)."""
        rules = [make_rule("exclude_path", None, p, "cli") for p in self.exclude_paths]
        rules += [make_rule("exclude_regex", None, r, "cli") for r in self.exclude_regex]
        if self.ignore_order:
            rules.append(make_rule("ignore_order", None, None, "cli"))
        if self.tolerance:
            rules.append(make_rule("tolerance", None, self.tolerance, "cli"))
        return rules

    @property
    def record_rules(self) -> EndpointRules:
        """Rules for one record of the list. Shadow rules of ``GET <path>`` name paths in the whole
        page (``root['items'][*]['etag']``): those under the list are moved to the record's root."""
        endpoint = f"GET {self.path}"
        prefix = (
            "root" + "".join(f"['{part}']" for part in (self.items_path or "").split(".") if part) + "[*]"
        )
        moved: list[Rule] = []
        for rule in self.shadow_rules:
            if not rule.applies_to(endpoint):
                continue
            if rule.kind == "exclude_path":
                if not rule.value.startswith(prefix):
                    continue
                rule = make_rule(
                    "exclude_path", ALL_ENDPOINTS, "root" + rule.value[len(prefix) :], rule.source
                )
            moved.append(rule)
        return RuleSet(tuple(self._own_rules() + moved)).for_endpoint(endpoint)

    @property
    def item_rules(self) -> EndpointRules:
        """Rules for ``GET <item path>``: the command line's and the shadow rules of that endpoint."""
        return RuleSet(tuple(self._own_rules()) + self.shadow_rules).for_endpoint(f"GET {self.item_path}")


def dig(value: Any, path: str | None) -> Any:
    """``items`` / ``data.items`` / ``meta.next`` in a JSON value (None when absent)."""
    if not path:
        return value
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


class Walker:
    def __init__(self, options: HttpOptions, progress: Callable[[str, int], None] | None = None) -> None:
        self.options = options
        self.throttle = Throttle(options.max_qps)
        self.progress = progress
        self.pages = {"v1": 0, "v2": 0}

    async def get(
        self, client: httpx.AsyncClient, version: str, url: str, params: dict[str, Any]
    ) -> httpx.Response:
        delay = self.throttle.reserve()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            return await client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise ParityError(f"{version} {self.options.path}: {type(exc).__name__}") from exc

    async def walk(self, client: httpx.AsyncClient, version: str, base: str) -> dict[str, Any]:
        """Every record of one side, by id. Duplicate ids across pages are an error (a broken cursor
        would otherwise pass for equality)."""
        o = self.options
        url = base.rstrip("/") + o.path
        records: dict[str, Any] = {}
        cursor: Any = None
        page = o.first_page
        offset = 0
        for _ in range(o.max_pages):
            params: dict[str, Any] = {}
            if o.paginate != "none":
                params[o.limit_param] = o.page_size
            if o.paginate == "cursor" and cursor is not None:
                params[o.cursor_param] = cursor
            elif o.paginate == "page":
                params[o.page_param] = page
            elif o.paginate == "offset":
                params[o.offset_param] = offset
            response = await self.get(client, version, url, params)
            if response.status_code != 200:
                raise ParityError(f"{version} {o.path} answered {response.status_code} (params {params})")
            try:
                body = orjson.loads(response.content)
            except orjson.JSONDecodeError as exc:
                raise ParityError(f"{version} {o.path} did not answer JSON") from exc
            items = dig(body, o.items_path)
            if not isinstance(items, list):
                raise ParityError(f"{version} {o.path}: no list at {o.items_path or 'the top level'}")
            for item in items:
                ident = dig(item, o.id_path)
                if ident is None:
                    raise ParityError(f"{version} {o.path}: a record has no {o.id_path}")
                key = str(ident)
                if key in records:
                    raise ParityError(f"{version} {o.path}: id {key} appears twice while paging")
                records[key] = item
            self.pages[version] += 1
            if self.progress:
                self.progress(version, len(records))
            if o.paginate == "none":
                break
            if o.paginate == "cursor":
                cursor = dig(body, o.next_path)
                if cursor in (None, "") or not items:
                    break
            else:
                if len(items) < o.page_size:
                    break
                page += 1
                offset += len(items)
        else:
            raise ParityError(f"{version} {o.path}: more than {o.max_pages} pages")
        return records

    async def run(self) -> list[TableResult]:
        o = self.options
        limits = httpx.Limits(max_connections=max(2, o.concurrency * 2))
        async with httpx.AsyncClient(headers=o.headers, timeout=o.timeout, limits=limits) as client:
            walked = await _together(self.walk(client, "v1", o.v1), self.walk(client, "v2", o.v2))
            if isinstance(walked, ParityError):
                return [TableResult(o.path, ERROR, error=str(walked), mode="http list")]
            left, right = walked
            results = [self.compare_lists(left, right)]
            if o.sample and o.item_path:
                results.append(await self.spot_check(client, sorted(set(left) & set(right))))
        return results

    def compare_lists(self, left: dict[str, Any], right: dict[str, Any]) -> TableResult:
        o = self.options
        result = TableResult(o.path, EQUAL, source_rows=len(left), target_rows=len(right), mode="http list")
        result.aggregates = {"pages": dict(self.pages)}
        rules = o.record_rules
        for key in sorted(left.keys() - right.keys(), key=_order):
            result.missing += 1
            if len(result.samples["missing"]) < o.samples:
                result.samples["missing"].append(key)
        for key in sorted(right.keys() - left.keys(), key=_order):
            result.extra += 1
            if len(result.samples["extra"]) < o.samples:
                result.samples["extra"].append(key)
        for key in sorted(left.keys() & right.keys(), key=_order):
            found = _record_differences(left[key], right[key], rules)
            if found:
                self._changed(result, key, found)
        result.status = DIFFERENT if result.differences else EQUAL
        return result

    def _changed(self, result: TableResult, key: str, found: dict[str, list[Any]]) -> None:
        result.changed += 1
        for name in found:
            result.changed_columns[name] = result.changed_columns.get(name, 0) + 1
        if len(result.samples["changed"]) < self.options.samples:
            result.samples["changed"].append({"key": key, "columns": found})

    async def spot_check(self, client: httpx.AsyncClient, ids: list[str]) -> TableResult:
        o = self.options
        assert o.item_path is not None
        chosen = random.Random(o.seed).sample(ids, min(o.sample, len(ids)))
        result = TableResult(
            o.item_path, EQUAL, source_rows=len(chosen), target_rows=len(chosen), mode="http item"
        )
        gate = asyncio.Semaphore(o.concurrency)
        rules = o.item_rules

        async def one(ident: str) -> tuple[str, dict[str, list[Any]]]:
            path = o.item_path.replace("{id}", quote(ident, safe="")) if o.item_path else ""
            async with gate:
                answers = []
                for version, base in (("v1", o.v1), ("v2", o.v2)):
                    response = await self.get(client, version, base.rstrip("/") + path, {})
                    answers.append(
                        Answer(
                            response.status_code, response.headers.get("content-type", ""), response.content
                        )
                    )
            found, _ = differences(answers[0], answers[1], rules)
            return ident, {d.field: [d.v1, d.v2] for d in found}

        outcomes = await _together(*(one(i) for i in chosen))
        if isinstance(outcomes, ParityError):
            return TableResult(o.item_path, ERROR, error=str(outcomes), mode="http item")
        for ident, found in sorted(outcomes, key=lambda pair: _order(pair[0])):
            if found:
                self._changed(result, ident, found)
        result.status = DIFFERENT if result.differences else EQUAL
        return result


async def _together(*work: Coroutine[Any, Any, T]) -> list[T] | ParityError:
    """All results, or the first failure with the other requests cancelled and awaited (a task
    group, so nothing is left running against a closed client)."""
    tasks: list[asyncio.Task[T]] = []
    failure: ParityError | None = None
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(item) for item in work]
    except* ParityError as errors:
        failure = errors.exceptions[0]  # type: ignore[assignment]
    if failure is not None:
        return failure
    return [task.result() for task in tasks]


def _record_differences(a: Any, b: Any, rules: EndpointRules) -> dict[str, list[Any]]:
    found, _ = differences(
        Answer(200, "application/json", orjson.dumps(a)),
        Answer(200, "application/json", orjson.dumps(b)),
        rules,
    )
    return {d.field: [display(d.v1), display(d.v2)] for d in found}


def _order(key: str) -> tuple[int, Any]:
    return (0, int(key)) if key.lstrip("-").isdigit() else (1, key)
