"""Every query of the dashboards shipped in dashboards/ names only metrics and labels the exporter publishes."""

import glob
import json
import os
import re

import promcheck
import pytest
from conftest import ROOT
from test_exporter import _exporter, _token_line

DASHBOARDS = sorted(glob.glob(os.path.join(ROOT, "dashboards", "*.json")))
IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
# PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "absent", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "label_values",
    "label_replace", "vector", "scalar", "time", "round", "ceil", "floor", "sort", "sort_desc", "inf", "nan",
}  # fmt: skip


def queries(dashboard):
    """(where, expr) of every panel target (rows' nested panels too) and every query variable."""
    out = []

    def walk(panels):
        for panel in panels or []:
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    out.append((panel.get("title"), target["expr"]))
            walk(panel.get("panels"))

    walk(dashboard.get("panels"))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            out.append((f"variable {var['name']}", query["query"] if isinstance(query, dict) else query))
    return out


def selectors(expr):
    """[(metric, {label names in its matcher})] of a PromQL expression, and grouping label names."""
    text = re.sub(r"\$__\w+|\$\{?\w+\}?", "X", expr)  # Grafana variables
    found = []
    for match in re.finditer(rf"({IDENT})\s*\{{([^}}]*)\}}", text):
        labels = set(re.findall(rf"({IDENT})\s*(?:=~|!~|!=|=)", re.sub(r'"(?:[^"\\]|\\.)*"', '""', match.group(2))))
        found.append((match.group(1), labels))
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    grouping = set()
    for match in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", bare):
        grouping |= {g.strip() for g in match.group(1).split(",") if g.strip()}
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    label_values = re.findall(rf"label_values\(\s*({IDENT})\s*,\s*({IDENT})\s*\)", bare)
    for metric, label in label_values:
        found.append((metric, {label}))
    bare = re.sub(r"label_values\([^)]*\)", "", bare)
    for name in re.findall(rf"(?<![\w.]){IDENT}", bare):
        if name not in PROMQL_WORDS and not re.fullmatch(r"e\d*|X", name) and all(name != f[0] for f in found):
            found.append((name, set()))
    return found, grouping


@pytest.fixture(scope="module")
def published(ex, tmp_path_factory):
    """Sample name -> label names, from a scrape in which every collector has data."""
    tmp = tmp_path_factory.mktemp("scrape")
    exporter = _exporter(ex, tmp)
    with open(tmp / "access.log", "a", encoding="utf-8") as handle:  # an answer with its tokens (issue 30)
        handle.write(_token_line("team-a", "qwen3:8b", prompt="9", output="3", source="reported", ttft="0.1",
                                 tpot="0.02", wait="0.01") + "\n")
    families = promcheck.parse(ex.render(exporter.collect()))
    names = {}
    for fam in families.values():
        for name, labels, _ in fam["samples"]:
            names.setdefault(name, set()).update(labels)
    return names


def test_dashboards_exist():
    assert DASHBOARDS, "no dashboard under dashboards/"


@pytest.mark.parametrize("path", DASHBOARDS, ids=[os.path.basename(p) for p in DASHBOARDS])
def test_dashboard_queries_use_published_metrics_and_labels(path, published):
    with open(path, encoding="utf-8") as handle:
        dashboard = json.load(handle)
    found_any = False
    problems = []
    for where, expr in queries(dashboard):
        metrics, grouping = selectors(expr)
        assert metrics, f"{where}: no metric found in {expr!r}"
        for metric, labels in metrics:
            found_any = True
            if metric not in published:
                problems.append(f"{where}: {metric} is not published by herd-exporter")
                continue
            if labels - published[metric]:
                problems.append(f"{where}: {metric} has no label {sorted(labels - published[metric])}")
            if grouping - published[metric] - {"le"}:
                problems.append(f"{where}: {metric} cannot be grouped by {sorted(grouping - published[metric])}")
    assert found_any
    assert not problems, "\n".join(problems)


def test_the_query_check_can_fail():
    metrics, grouping = selectors(
        'histogram_quantile(0.95, sum by (le, pod) (rate(herd_nope_bucket{host=~"$host",zone="a"}[$__rate_interval])))'
    )
    assert metrics == [("herd_nope_bucket", {"host", "zone"})] and grouping == {"le", "pod"}
    assert selectors("label_values(herd_instance_up, host)")[0] == [("herd_instance_up", {"host"})]
    assert selectors("sum(herd_a) / herd_b")[0] == [("herd_a", set()), ("herd_b", set())]
