#!/usr/bin/env python3
"""herd_usage: tokens and requests per API key and model over a period, from Prometheus's record.

The gateway reads every answer's token counts (herd_gateway/usage.lua) into its access log; herd-exporter sums
them as herd_gateway_tokens_total{key,model,type} and herd_gateway_key_requests_total{key,model,status}; the
Prometheus of playbooks/monitoring.yml keeps them. This asks that Prometheus's HTTP API (/api/v1/query) for the
increase of both over the period ending at --at, summed over every gateway, and prints one row per key and model.

Standard library only. Examples::

    python3 tools/herd_usage.py --prometheus http://mon1:9090 --period 30d
    python3 tools/herd_usage.py --prometheus http://127.0.0.1:9090 --period 24h --at 2026-12-01T00:00:00Z --json

Key "none" is the requests without an API key (a gateway without gateway_api_keys). Counters restart with the
exporter; Prometheus's increase() accounts for that, and extrapolates to the period's edges (figures are
estimates to about one scrape interval).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

PERIOD_RE = re.compile(r"^[1-9][0-9]*[smhdwy]$")
TOKENS = 'sum by (key, model, type) (increase(herd_gateway_tokens_total[{period}]))'
REQUESTS = 'sum by (key, model, status) (increase(herd_gateway_key_requests_total[{period}]))'


class UsageError(Exception):
    """A problem the operator can fix: the message names it and the fix."""


def _timestamp(text):
    """--at as a Unix time: "now", a number, or an ISO 8601 date and time (Z or an offset)."""
    if text == "now":
        return datetime.datetime.now(datetime.UTC).timestamp()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r} is not a time. Fix: now, a Unix time or e.g. 2026-12-01T00:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def query(base, expr, at, timeout=30):
    """The vector result of one instant query: [(labels, value)]."""
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise UsageError(f"Prometheus at {base} answered {exc.code} to {expr!r}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(f"no Prometheus answers at {base} ({exc}). Fix: deploy one with playbooks/monitoring.yml "
                         "(a host in group monitoring) and pass its address with --prometheus") from None
    except ValueError:
        raise UsageError(f"{base} did not answer Prometheus's JSON: is it a Prometheus server?") from None
    if doc.get("status") != "success" or (doc.get("data") or {}).get("resultType") != "vector":
        raise UsageError(f"Prometheus at {base} refused {expr!r}: {doc.get('error') or doc}")
    rows = []
    for item in doc["data"]["result"]:
        try:
            rows.append((item["metric"], float(item["value"][1])))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    return rows


def usage(base, period, at):
    """{(key, model): {requests, refused, failed, prompt_tokens, output_tokens}} over `period` ending at `at`."""
    if not PERIOD_RE.match(period):
        raise UsageError(f"--period {period!r} is not a Prometheus duration. Fix: e.g. 24h, 7d or 30d")
    table = {}

    def row(labels):
        return table.setdefault((labels.get("key", ""), labels.get("model", "")), {
            "requests": 0.0, "refused": 0.0, "failed": 0.0, "prompt_tokens": 0.0, "output_tokens": 0.0})

    for labels, value in query(base, REQUESTS.format(period=period), at):
        status = labels.get("status", "")
        target = "requests" if status.startswith("2") else "refused" if status == "429" else "failed"
        row(labels)[target] += value
    for labels, value in query(base, TOKENS.format(period=period), at):
        kind = labels.get("type")
        if kind in ("prompt", "output"):
            row(labels)[f"{kind}_tokens"] += value
    return table


def render(table, period, at):
    when = datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    lines = [f"herd usage over {period} up to {when} (Prometheus increase(), summed over every gateway)",
             f"{'key':<24} {'model':<32} {'requests':>10} {'429':>8} {'other':>8} {'prompt tokens':>15} "
             f"{'output tokens':>15}"]
    totals = {"requests": 0.0, "refused": 0.0, "failed": 0.0, "prompt_tokens": 0.0, "output_tokens": 0.0}
    for (key, model), r in sorted(table.items()):
        lines.append(f"{key:<24} {model:<32} {r['requests']:>10.0f} {r['refused']:>8.0f} {r['failed']:>8.0f} "
                     f"{r['prompt_tokens']:>15.0f} {r['output_tokens']:>15.0f}")
        for name in totals:
            totals[name] += r[name]
    lines.append(f"{'all':<24} {'':<32} {totals['requests']:>10.0f} {totals['refused']:>8.0f} "
                 f"{totals['failed']:>8.0f} {totals['prompt_tokens']:>15.0f} {totals['output_tokens']:>15.0f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus's base URL, e.g. http://mon1:9090")
    parser.add_argument("--period", default="24h", help="how far back from --at (Prometheus duration; 24h)")
    parser.add_argument("--at", default="now", help="end of the period: now, a Unix time or an ISO 8601 time")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    try:
        at = _timestamp(args.at)
        table = usage(args.prometheus, args.period, at)
    except UsageError as exc:
        print(f"herd_usage: {exc}", file=sys.stderr)
        return 2
    if not table:
        print(f"herd_usage: Prometheus at {args.prometheus} holds no herd_gateway_key_requests_total over "
              f"{args.period}: is it scraping the gateways' herd-exporter (playbooks/monitoring.yml)?",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"key": k, "model": m, **{n: round(v) for n, v in r.items()}}
                          for (k, m), r in sorted(table.items())], indent=2))
    else:
        print(render(table, args.period, at))
    return 0


if __name__ == "__main__":
    sys.exit(main())
