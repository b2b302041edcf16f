"""The Grafana dashboard (deploy/grafana/glmvision.json): importable, laid out, and querying real metrics."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from glmvision.ops.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "glmvision.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
INSTANCE_FILTER = 'instance=~"$instance"'
GRID_COLUMNS = 24
METRIC = re.compile(r"glmvision_[a-z0-9_]+")
# A metric name and the label matchers right after it, if any (strings may hold braces).
SELECTOR = re.compile(r"(glmvision_[a-z0-9_]+)\s*(\{(?:[^{}\"]|\"(?:[^\"\\]|\\.)*\")*\})?")
STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`")
RATED_SUFFIXES = ("_total", "_bucket", "_sum", "_count")

# Panel title (compared case-insensitively) -> its unit and metrics it must chart.
REQUIRED_PANELS: dict[str, tuple[str, set[str]]] = {
    "request rate": ("reqps", {"glmvision_requests_total"}),
    "error rate by code": ("reqps", {"glmvision_requests_total"}),
    "latency p50 / p95 / p99": ("s", {"glmvision_request_duration_seconds_bucket"}),
    "tokens/s": (
        "short",
        {
            "glmvision_prompt_tokens_total",
            "glmvision_visual_tokens_total",
            "glmvision_completion_tokens_total",
        },
    ),
    "queue depth": (
        "short",
        {"glmvision_queue_depth", "glmvision_running_requests", "glmvision_active_requests"},
    ),
    "gpu memory": (
        "bytes",
        {
            "glmvision_gpu_memory_allocated_bytes",
            "glmvision_gpu_memory_reserved_bytes",
            "glmvision_gpu_memory_total_bytes",
        },
    ),
    "cache hit ratio": ("percentunit", {"glmvision_cache_hits_total", "glmvision_cache_misses_total"}),
    "rejections by reason": ("reqps", {"glmvision_rejections_total"}),
    "batch size": ("short", {"glmvision_batch_size_bucket"}),
    "model loaded": ("short", {"glmvision_model_loaded"}),
    "model info": ("short", {"glmvision_model_info"}),
    "degraded, fallbacks, circuit trips and upstream failures": (
        "reqps",
        {
            "glmvision_degraded_total",
            "glmvision_fallbacks_total",
            "glmvision_circuit_trips_total",
            "glmvision_upstream_failures_total",
        },
    ),
}


# The checker: every rule below, as problems found in a dashboard model (empty when it is sound).


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def all_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def strip_strings(expr: str) -> str:
    """The expression with every string literal emptied (label values may hold any character)."""
    return STRING.sub('""', expr)


def is_balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in strip_strings(expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            if not stack or stack.pop() != pairs[char]:
                return False
    return not stack


def call_arguments(expr: str, function: str) -> list[list[str]]:
    """The top-level arguments of each call of `function` in expr (an unclosed call gives none)."""
    calls: list[list[str]] = []
    for match in re.finditer(rf"\b{function}\s*\(", expr):
        depth, args, start = 1, [], match.end()
        quote: str | None = None
        for index in range(match.end(), len(expr)):
            char = expr[index]
            if quote:
                quote = None if char == quote and expr[index - 1] != "\\" else quote
            elif char in "\"'`":
                quote = char
            elif char in "([{":
                depth += 1
            elif char in ")]}":
                depth -= 1
                if depth == 0:
                    args.append(expr[start:index].strip())
                    calls.append(args)
                    break
            elif char == "," and depth == 1:
                args.append(expr[start:index].strip())
                start = index + 1
    return calls


def grouping_labels(aggregation: str) -> set[str] | None:
    """The `by` labels of `sum by (...) (...)` or `sum(...) by (...)`; None for anything else."""
    leading = re.fullmatch(r"sum\s+by\s*\(([^)]*)\)\s*\(.*\)", aggregation, re.DOTALL)
    trailing = re.fullmatch(r"sum\s*\(.*\)\s*by\s*\(([^)]*)\)", aggregation, re.DOTALL)
    match = leading or trailing
    if match is None:
        return None
    return {label.strip() for label in match.group(1).split(",") if label.strip()}


def expr_problems(expr: str, names: set[str]) -> list[str]:
    """What is wrong with one PromQL expression of the dashboard."""
    problems: list[str] = []
    if not is_balanced(expr):
        problems.append(f"unbalanced brackets: {expr}")
    used = METRIC.findall(expr)
    if not used:
        problems.append(f"queries no glmvision metric: {expr}")
    problems.extend(f"unknown metric {name}: {expr}" for name in sorted(set(used) - names))
    for selector in SELECTOR.finditer(expr):
        name, matchers = selector.group(1), selector.group(2) or ""
        if INSTANCE_FILTER not in matchers:
            problems.append(f"{name} not filtered by {INSTANCE_FILTER}: {expr}")
        rated = re.search(r"\b(?:rate|irate|increase)\s*\(\s*$", expr[: selector.start()]) is not None
        if name.endswith(RATED_SUFFIXES) and not rated:
            problems.append(f"counter {name} used without rate(): {expr}")
        if not name.endswith(RATED_SUFFIXES) and rated:
            problems.append(f"gauge {name} used in rate(): {expr}")
    ranges = [r for r in re.findall(r"\[([^\]]*)\]", strip_strings(expr)) if r != "$__rate_interval"]
    problems.extend(f"range [{value}] is not [$__rate_interval]: {expr}" for value in ranges)
    for args in call_arguments(expr, "histogram_quantile"):
        if len(args) != 2:
            problems.append(f"histogram_quantile needs 2 arguments: {expr}")
            continue
        quantile, inner = args
        try:
            valid_quantile = 0 <= float(quantile) <= 1
        except ValueError:
            valid_quantile = False
        if not valid_quantile:
            problems.append(f"histogram_quantile's quantile {quantile!r} is not in [0, 1]: {expr}")
        labels = grouping_labels(inner)
        if labels is None or "le" not in labels:
            problems.append(f"histogram_quantile not over a sum by (le ...): {expr}")
        series = METRIC.findall(inner)
        if not series or not all(name.endswith("_bucket") for name in series):
            problems.append(f"histogram_quantile not over _bucket series: {expr}")
    return problems


def layout_problems(panels: list[dict[str, Any]]) -> list[str]:
    """Duplicate ids, panels off the 24-column grid, and overlapping panels."""
    problems: list[str] = []
    ids = [panel.get("id") for panel in panels]
    for panel_id in sorted({i for i in ids if ids.count(i) > 1}, key=str):
        problems.append(f"panel id {panel_id} is used more than once")
    problems.extend(
        f"panel {p.get('title')!r} has no integer id" for p in panels if type(p.get("id")) is not int
    )
    boxes: list[tuple[str, int, int, int, int]] = []
    for panel in panels:
        title, pos = str(panel.get("title")), panel.get("gridPos", {})
        try:
            x, y, w, h = (int(pos[key]) for key in ("x", "y", "w", "h"))
        except (KeyError, TypeError, ValueError):
            problems.append(f"panel {title!r} has no complete gridPos")
            continue
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > GRID_COLUMNS:
            problems.append(f"panel {title!r} is off the {GRID_COLUMNS}-column grid: {pos}")
        for other, ox, oy, ow, oh in boxes:
            if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                problems.append(f"panels {other!r} and {title!r} overlap")
        boxes.append((title, x, y, w, h))
    return problems


def dashboard_problems(dashboard: dict[str, Any], names: set[str]) -> list[str]:
    """Everything the checker finds wrong in a dashboard model."""
    panels = all_panels(dashboard)
    problems = layout_problems(panels)
    for panel in panels:
        if panel.get("type") != "row" and panel.get("datasource") != DATASOURCE:
            problems.append(f"panel {panel.get('title')!r} has datasource {panel.get('datasource')}")
    targets = list(all_targets(dashboard))
    if not targets:
        problems.append("the dashboard has no queries")
    for panel, target in targets:
        if target.get("datasource") != DATASOURCE:
            problems.append(f"a target of {panel.get('title')!r} has datasource {target.get('datasource')}")
        expr = target.get("expr")
        if not isinstance(expr, str) or not expr.strip():
            problems.append(f"a target of {panel.get('title')!r} has no expr")
            continue
        problems.extend(f"{panel.get('title')!r}: {problem}" for problem in expr_problems(expr, names))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("definition", "")
        problems.extend(
            f"variable {variable.get('name')!r} queries unknown metric {name}"
            for name in sorted(set(METRIC.findall(query)) - names)
        )
    return problems


# Fixtures and helpers.


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    model = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(model, dict)
    return model


@pytest.fixture(scope="module")
def metric_names() -> set[str]:
    return set(Metrics().names())


def panel_titled(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    matches = [p for p in all_panels(dashboard) if str(p.get("title", "")).casefold() == title.casefold()]
    assert len(matches) == 1, f"want one panel titled {title!r}, found {len(matches)}"
    return matches[0]


def exprs_of(panel: dict[str, Any]) -> list[str]:
    return [str(target.get("expr", "")) for target in panel.get("targets", [])]


def grouping_labels_any(expr: str) -> set[str]:
    """Every label named in any `by (...)` of expr."""
    return {
        label.strip()
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


# The dashboard model.


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    inputs = {entry["name"]: entry for entry in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    requires = {(entry["type"], entry["id"]) for entry in dashboard["__requires"]}
    assert {("grafana", "grafana"), ("datasource", "prometheus")} <= requires
    used_types = {panel["type"] for panel in all_panels(dashboard)}
    assert used_types <= {entry_id for kind, entry_id in requires if kind == "panel"}
    assert dashboard["uid"] == "glmvision"
    assert dashboard["title"] == "glmvision"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert "id" in dashboard and dashboard["id"] is None
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard["refresh"] == "30s"
    assert "30s" in dashboard["timepicker"].get("refresh_intervals", ["30s"])


def test_instance_variable(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["datasource"] == DATASOURCE
    assert re.sub(r"\s", "", instance["definition"]) == "label_values(glmvision_requests_total,instance)"
    query = instance["query"]
    query_text = query["query"] if isinstance(query, dict) else query
    assert query_text == instance["definition"]
    assert instance["multi"] is True
    assert instance["includeAll"] is True


def test_no_leftover_datasource_references(dashboard: dict[str, Any]) -> None:
    """Only the declared input is referenced: no datasource uid of the machine it was drawn on."""
    text = DASHBOARD.read_text(encoding="utf-8")
    referenced = set(re.findall(r"\$\{(DS_[A-Z0-9_]+)\}", text))
    assert referenced == {entry["name"] for entry in dashboard["__inputs"]}
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text)) - {dashboard["uid"]}
    assert uids <= {"${DS_PROMETHEUS}", "-- Grafana --"}


@pytest.mark.parametrize("title", sorted(REQUIRED_PANELS))
def test_required_panel(dashboard: dict[str, Any], metric_names: set[str], title: str) -> None:
    unit, metrics = REQUIRED_PANELS[title]
    panel = panel_titled(dashboard, title)
    assert panel["fieldConfig"]["defaults"]["unit"] == unit
    used = {name for expr in exprs_of(panel) for name in METRIC.findall(expr)}
    assert metrics <= used, f"{title!r} does not chart {sorted(metrics - used)}"
    assert metrics <= metric_names  # this table itself names real metrics


def test_latency_panel_has_p50_p95_p99(dashboard: dict[str, Any]) -> None:
    panel = panel_titled(dashboard, "latency p50 / p95 / p99")
    quantiles = sorted(
        float(args[0]) for e in exprs_of(panel) for args in call_arguments(e, "histogram_quantile")
    )
    assert quantiles == [0.5, 0.95, 0.99]


def test_error_panel_counts_only_4xx_and_5xx_by_code(dashboard: dict[str, Any]) -> None:
    exprs = exprs_of(panel_titled(dashboard, "error rate by code"))
    assert exprs
    for expr in exprs:
        assert re.search(r'status=~"(4\.\.|5\.\.|\[45\]\.\.)"', expr), expr
        assert re.search(r"\bby\s*\([^)]*\bcode\b", expr), expr
    statuses = {status for expr in exprs for status in re.findall(r'status=~"([^"]*)"', expr)}
    assert statuses in ({"4..", "5.."}, {"[45].."})


def test_cache_hit_ratio_is_hits_over_hits_plus_misses(dashboard: dict[str, Any]) -> None:
    panel = panel_titled(dashboard, "cache hit ratio")
    (expr,) = exprs_of(panel)
    numerator, _, denominator = strip_strings(expr).partition(" / ")
    assert METRIC.findall(numerator) == ["glmvision_cache_hits_total"]
    assert sorted(METRIC.findall(denominator)) == [
        "glmvision_cache_hits_total",
        "glmvision_cache_misses_total",
    ]
    assert panel["fieldConfig"]["defaults"].get("max") == 1


def test_gpu_memory_split_by_device_and_pid(dashboard: dict[str, Any]) -> None:
    exprs = exprs_of(panel_titled(dashboard, "gpu memory"))
    per_worker = [e for e in exprs if re.search(r"glmvision_gpu_memory_(allocated|reserved)_bytes", e)]
    assert len(per_worker) == 2
    for expr in per_worker:
        labels = grouping_labels_any(expr)
        assert {"device", "pid"} <= labels, expr


def test_every_panel_has_unit_and_description(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        if panel.get("type") == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']!r} has no unit"
        assert len(str(panel.get("description", ""))) >= 20, f"{panel['title']!r} has no description"
        assert panel.get("targets"), f"{panel['title']!r} has no queries"


def test_every_metric_family_is_charted(dashboard: dict[str, Any], metric_names: set[str]) -> None:
    """A metric added to Metrics without a panel fails here (a histogram counts through any of its series)."""
    used = {name for _, target in all_targets(dashboard) for name in METRIC.findall(target["expr"])}
    families = {re.sub(r"(_total|_bucket|_sum|_count)$", "", name) for name in metric_names}
    charted = {re.sub(r"(_total|_bucket|_sum|_count)$", "", name) for name in used}
    assert families - charted == set()


# The rules, one at a time on the real dashboard (each also inside dashboard_problems).


def test_panel_ids_and_layout(dashboard: dict[str, Any]) -> None:
    assert layout_problems(all_panels(dashboard)) == []


def test_datasources(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "datasource":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_a_provisioned_copy_resolves_the_datasource_through_a_variable(dashboard: dict[str, Any]) -> None:
    # File provisioning does not fill __inputs: ${DS_PROMETHEUS} must also name a datasource variable.
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"


def test_exprs_reference_only_exported_metrics(dashboard: dict[str, Any], metric_names: set[str]) -> None:
    for panel, target in all_targets(dashboard):
        names = METRIC.findall(target["expr"])
        assert names, f"{panel['title']!r}: {target['expr']}"
        assert set(names) <= metric_names, f"{panel['title']!r}: {target['expr']}"


def test_every_expr_filters_instance(dashboard: dict[str, Any]) -> None:
    for panel, target in all_targets(dashboard):
        expr = target["expr"]
        assert INSTANCE_FILTER in expr, f"{panel['title']!r}: {expr}"
        for selector in SELECTOR.finditer(expr):
            assert INSTANCE_FILTER in (selector.group(2) or ""), f"{selector.group(1)} in {expr}"


def test_promql_is_balanced(dashboard: dict[str, Any]) -> None:
    for panel, target in all_targets(dashboard):
        assert is_balanced(target["expr"]), f"{panel['title']!r}: {target['expr']}"


def test_histogram_quantiles_are_over_buckets_by_le(dashboard: dict[str, Any]) -> None:
    seen = 0
    for _, target in all_targets(dashboard):
        for quantile, inner in call_arguments(target["expr"], "histogram_quantile"):
            seen += 1
            assert 0 < float(quantile) < 1
            labels = grouping_labels(inner)
            assert labels is not None and "le" in labels, inner
            assert all(name.endswith("_bucket") for name in METRIC.findall(inner)), inner
    assert seen >= 9  # latency x3, four stages, batch size x2 (and image pixels)


def test_checker_accepts_the_dashboard(dashboard: dict[str, Any], metric_names: set[str]) -> None:
    assert dashboard_problems(dashboard, metric_names) == []


# The checker bites: one change to a copy of the dashboard, and dashboard_problems names it.


def _set_expr(title: str, change: Callable[[str], str]) -> Callable[[dict[str, Any]], None]:
    def mutate(model: dict[str, Any]) -> None:
        target = panel_titled(model, title)["targets"][0]
        changed = change(target["expr"])
        assert changed != target["expr"], "the mutation changed nothing"
        target["expr"] = changed

    return mutate


def _overlap(model: dict[str, Any]) -> None:
    panel_titled(model, "gpu memory")["gridPos"] = dict(panel_titled(model, "queue depth")["gridPos"])


def _off_grid(model: dict[str, Any]) -> None:
    panel_titled(model, "cache hit ratio")["gridPos"]["w"] = 13


def _duplicate_id(model: dict[str, Any]) -> None:
    panel_titled(model, "tokens/s")["id"] = panel_titled(model, "request rate")["id"]


def _panel_datasource(model: dict[str, Any]) -> None:
    panel_titled(model, "request rate")["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}


def _target_datasource(model: dict[str, Any]) -> None:
    panel_titled(model, "queue depth")["targets"][0]["datasource"] = "Prometheus"


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "made-up metric": (
        _set_expr(
            "request rate", lambda e: e.replace("glmvision_requests_total", "glmvision_requestz_total")
        ),
        "unknown metric glmvision_requestz_total",
    ),
    "renamed histogram": (
        _set_expr(
            "latency p50 / p95 / p99",
            lambda e: e.replace("glmvision_request_duration_seconds", "glmvision_request_latency_seconds"),
        ),
        "unknown metric glmvision_request_latency_seconds_bucket",
    ),
    "no instance filter": (
        _set_expr("queue depth", lambda e: e.replace(INSTANCE_FILTER, "")),
        "not filtered by",
    ),
    "unbalanced": (_set_expr("tokens/s", lambda e: e[:-1]), "unbalanced brackets"),
    "quantile not by le": (
        _set_expr("latency p50 / p95 / p99", lambda e: re.sub(r"sum by \(le\)", "sum", e)),
        "not over a sum by (le",
    ),
    "quantile over a counter": (
        _set_expr(
            "batch size", lambda e: e.replace("glmvision_batch_size_bucket", "glmvision_batch_size_count")
        ),
        "not over _bucket series",
    ),
    "gauge in rate()": (
        _set_expr("queue depth", lambda e: re.sub(r"sum\((.*)\)", r"sum(rate(\1[$__rate_interval]))", e)),
        "gauge glmvision_queue_depth used in rate()",
    ),
    "counter without rate()": (
        _set_expr("tokens/s", lambda e: re.sub(r"rate\((.*)\[\$__rate_interval\]\)", r"\1", e)),
        "used without rate()",
    ),
    "fixed range": (
        _set_expr("request rate", lambda e: e.replace("[$__rate_interval]", "[5m]")),
        "range [5m]",
    ),
    "overlapping panels": (_overlap, "overlap"),
    "off the grid": (_off_grid, "off the 24-column grid"),
    "duplicate id": (_duplicate_id, "used more than once"),
    "panel datasource": (_panel_datasource, "has datasource"),
    "target datasource": (_target_datasource, "has datasource Prometheus"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_checker_rejects_a_broken_copy(
    dashboard: dict[str, Any], metric_names: set[str], mutation: str
) -> None:
    mutate, expected = MUTATIONS[mutation]
    broken = copy.deepcopy(dashboard)
    mutate(broken)
    problems = dashboard_problems(broken, metric_names)
    assert any(expected in problem for problem in problems), problems
    assert dashboard_problems(dashboard, metric_names) == []  # the original is untouched
