"""`saferollout traffic`: the live-traffic simulator from the command line, with a progress display."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from saferollout.cli.options import common_options
from saferollout.errors import SpecError
from saferollout.processes import pid_alive
from saferollout.traffic import DEFAULT_MAX_IN_FLIGHT, LoadGenerator, TrafficResult, load_request_bodies


def register(subparsers: Any) -> None:
    """Add `saferollout traffic -n ENDPOINT --rps R --duration D [--results FILE] [--batch-size N]`."""
    text = ("Replay held-out rows of the German credit data (or the bodies of --request-file) to an endpoint at "
            "a fixed rate (open loop), like live clients, and report the client-side outcome.")
    parser = subparsers.add_parser("traffic", help="send live-like traffic to an endpoint", description=text,
                                   parents=[common_options()])
    parser.add_argument("-n", "--name", "--endpoint-name", dest="name", required=True, help="endpoint name")
    parser.add_argument("--rps", type=float, default=15.0, help="requests per second (default 15)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds to run (default 60; 0 = until stopped, at most 4 hours)")
    parser.add_argument("--results", help="append each request's outcome to this JSON-lines file")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--request-file", default=None,
                        help="replay these request bodies instead: one JSON body, or a .jsonl file of one per line")
    parser.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                        help=f"bound on requests awaiting an answer (default {DEFAULT_MAX_IN_FLIGHT})")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/test split (default 42)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument("--stop-with", type=int, metavar="PID", default=None,
                        help="stop when the process PID ends (e.g. the runner that started this generator)")
    parser.set_defaults(handler=traffic_command)


def traffic_command(args: Any, backend_factory: Callable[[], Any]) -> int:
    """CLI handler: replay the held-out rows, show progress, print the result; 0 when it ran."""
    from saferollout import data
    from saferollout.output import emit

    if args.rps <= 0:
        raise SpecError(f"--rps must be positive, got {args.rps:g}")
    if args.duration < 0:
        raise SpecError(f"--duration must be 0 (until stopped) or positive, got {args.duration:g}")
    if args.batch_size < 1:
        raise SpecError(f"--batch-size must be at least 1, got {args.batch_size}")
    # more requests in flight than the HTTP pool keeps is normal under load: not worth a warning each
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    backend = backend_factory()
    backend.get_endpoint(args.name)  # NotFound with the platform's message before any load is built
    if getattr(args, "request_file", None):
        bodies = load_request_bodies(args.request_file)
    else:
        bodies = data.sample_requests(data.split(seed=args.seed).X_test, args.batch_size)
    generator = LoadGenerator(backend, args.name, bodies, args.rps, args.duration or None,
                              results_path=args.results, max_in_flight=args.max_in_flight)
    _stop_on_sigterm(generator)
    if args.quiet:
        result = _run_interruptibly(generator, args.stop_with)
    else:
        result = _run_with_progress(generator, args.name, args.stop_with)
    emit(result.to_dict(), getattr(args, "output", "json"), getattr(args, "query", None))
    return 0


def _stop_on_sigterm(generator: LoadGenerator) -> None:
    """SIGTERM (stop_background) ends the schedule; in-flight requests still complete and are recorded."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: generator.request_stop())


def _run_interruptibly(generator: LoadGenerator, stop_with: int | None = None) -> TrafficResult:
    generator.start()
    try:
        while not generator.wait(0.2):
            if stop_with is not None and not pid_alive(stop_with):
                break  # whoever wanted this traffic is gone
    except KeyboardInterrupt:
        pass
    return generator.stop()


def _run_with_progress(generator: LoadGenerator, endpoint: str, stop_with: int | None = None) -> TrafficResult:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    total = generator.duration_s
    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.fields[sent]} sent, {task.fields[ok]} ok, {task.fields[failed]} failed, "
                          "p50 {task.fields[p50]} ms"), TimeElapsedColumn()]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(f"{endpoint} @ {generator.rps:g} rps", total=total, sent=0, ok=0, failed=0, p50="-")

        def show(result: TrafficResult) -> None:
            p50 = result.latencies_ms.get("p50")
            bar.update(task, completed=min(result.duration_s, total) if total else None, sent=result.sent,
                       ok=result.ok, failed=result.failed, p50="-" if p50 is None else f"{p50:.0f}")

        generator.progress = show
        return _run_interruptibly(generator, stop_with)
