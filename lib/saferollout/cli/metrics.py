"""`saferollout metrics`: an endpoint's metrics by Azure Monitor name, or its raw request samples.
"""
from __future__ import annotations

import argparse
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

from saferollout.backends.base import AGGREGATIONS, DEPLOYMENT_METRIC_DIMENSIONS, METRIC_NAMES
from saferollout.errors import (BackendError, SpecError, UsageError)
from saferollout.cli.options import (add_endpoint_name, common_options, name_type, print_result)


DEFAULT_METRICS_WINDOW = timedelta(hours=1)


def register(commands: Any) -> None:
    common = common_options()
    help_text = ("Query an endpoint's metrics by Azure Monitor name, or its raw request samples "
                 "(--samples).")
    leaf = commands.add_parser("metrics", help=help_text, description=help_text, parents=[common])
    leaf.set_defaults(handler=metrics_query)
    add_endpoint_name(leaf)
    leaf.add_argument("--metrics", "--metric", dest="metrics", nargs="+", default=["RequestsPerMinute"],
                      metavar="NAME", help="RequestsPerMinute, RequestLatency, RequestLatency_P50/_P90/_P95/_P99")
    leaf.add_argument("--aggregation", default="Average", help="Average, Minimum, Maximum, Total or Count")
    leaf.add_argument("--interval", "--grain", dest="grain", default="PT1M", help="time grain (ISO 8601, e.g. PT1M)")
    leaf.add_argument("--timespan", help="ISO 8601 duration back from the end (PT15M) or START/END")
    leaf.add_argument("--start-time", help="window start (ISO 8601; default one hour before the end)")
    leaf.add_argument("--end-time", help="window end (ISO 8601; default now)")
    leaf.add_argument("--filter", help="e.g. \"deployment eq 'green' and statusCodeClass ne '2xx'\"")
    leaf.add_argument("--split-by", nargs="+", default=[], metavar="DIMENSION", help="e.g. deployment")
    leaf.add_argument("--samples", action="store_true", help="print raw per-request samples instead")
    leaf.add_argument("-d", "--deployment-name", type=name_type("deployment"), help="samples of this deployment only")
    leaf.add_argument("--include-mirrored", action="store_true", help="samples: include mirrored requests")



# ---- metrics --------------------------------------------------------------------------------

def _parse_time(text: str, flag: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SpecError(f"invalid {flag} {text!r}: use ISO 8601, e.g. 2026-11-27T08:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _parse_duration(text: str, flag: str) -> timedelta:
    from saferollout.backends.query import grain_seconds  # the one ISO 8601 duration parser

    try:
        return timedelta(seconds=grain_seconds(text.strip()))
    except SpecError:
        raise SpecError(f"invalid {flag} {text!r}: use an ISO 8601 duration such as PT15M or PT1H") from None


def metrics_window(timespan: str | None, start_time: str | None, end_time: str | None,
                   now: datetime | None = None) -> tuple[datetime, datetime]:
    """The query window from az-style flags: --timespan (duration or START/END), --start-time, --end-time."""
    end = _parse_time(end_time, "--end-time") if end_time else (now or datetime.now(timezone.utc))
    if timespan and start_time:
        raise UsageError("give --timespan or --start-time, not both")
    if timespan and "/" in timespan:
        first, _, second = timespan.partition("/")
        start = _parse_time(first, "--timespan")
        end = (start + _parse_duration(second, "--timespan")) if second.strip().upper().startswith("P") \
            else _parse_time(second, "--timespan")
    elif timespan:
        start = end - _parse_duration(timespan, "--timespan")
    elif start_time:
        start = _parse_time(start_time, "--start-time")
    else:
        start = end - DEFAULT_METRICS_WINDOW
    if start >= end:
        raise SpecError(f"the metrics window is empty: start {start.isoformat()} is not before end {end.isoformat()}")
    return start, end


def _canonical(name: str, known: Sequence[str]) -> str:
    """Azure Monitor reads metric and aggregation names case-insensitively; so do we."""
    return next((item for item in known if item.lower() == name.lower()), name)


def metrics_query(args: argparse.Namespace, backend: Callable[[], Any]) -> int:
    start, end = metrics_window(args.timespan, args.start_time, args.end_time)
    platform = backend()
    if args.samples:
        if not platform.supports_raw_samples:
            raise BackendError(f"the {platform.name} backend has no raw request samples: query metrics instead")
        return print_result(args, platform.request_samples(args.endpoint_name, deployment=args.deployment_name,
                                                     start=start, end=end, include_mirrored=args.include_mirrored))
    series: list[Any] = []
    aggregation = _canonical(args.aggregation, AGGREGATIONS)
    for metric in args.metrics:
        name = _canonical(metric, (*METRIC_NAMES, *DEPLOYMENT_METRIC_DIMENSIONS))
        series.extend(platform.query_metrics(args.endpoint_name, name, aggregation=aggregation,
                                             grain=args.grain, start=start, end=end, filter=args.filter,
                                             split_by=args.split_by))
    return print_result(args, series)

