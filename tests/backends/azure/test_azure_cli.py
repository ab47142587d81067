"""`saferollout --backend azure` as a user runs it: the real SDK over the wire fake, in a subprocess.

The subprocess reaches the test's fake workspace as a notebook kernel does: the client factory and the
fake's state directory are named in its environment (docs/azure.md, section 6).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "saferollout"


def run_cli(fake, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
               SAFEROLLOUT_AZURE_CLIENT_FACTORY="fakes.azure_wire:client_factory",
               SAFEROLLOUT_AZURE_FAKE_DIR=str(fake.state.root))
    env.pop("SAFEROLLOUT_BACKEND", None)
    return subprocess.run([str(CLI), "--backend", "azure", *args], env=env, capture_output=True, text=True,
                          timeout=90)


def release_files(example_dir: Path, folder: Path, endpoint: str) -> Path:
    """The example deployment as `green` on `endpoint`, with its scoring script, in a folder of its own."""
    folder.mkdir()
    spec = (example_dir / "deployment.yml").read_text().replace("name: blue", "name: green") \
        .replace("endpoint_name: credit-risk", f"endpoint_name: {endpoint}")
    (folder / "deployment.yml").write_text(spec)
    for name in ("score.py", "conda.yml"):
        (folder / name).write_text((example_dir / name).read_text())
    return folder / "deployment.yml"


def test_deployment_create_prints_clean_json_and_memory_can_be_queried(fake, served, example_dir, tmp_path):
    created = run_cli(fake, "online-deployment", "create", "-f",
                      str(release_files(example_dir, tmp_path / "release", served)), "-o", "json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["name"] == "green"  # stdout is the JSON alone (finding 8)
    assert "Succeeded" in created.stderr  # the progress is shown, on stderr

    shown = run_cli(fake, "metrics", "-e", served, "--metric", "CpuMemoryUtilizationPercentage",
                    "--aggregation", "Maximum", "--filter", "deployment eq 'green'", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["metric"] == "CpuMemoryUtilizationPercentage"


def test_an_unknown_endpoint_is_one_line_on_stderr_and_exit_1(fake):
    shown = run_cli(fake, "online-endpoint", "show", "-n", "ep-missing", "-o", "json")
    assert shown.returncode == 1
    assert shown.stdout == ""
    assert shown.stderr.startswith("error: ") and "ep-missing" in shown.stderr and "not found" in shown.stderr
    assert "Traceback" not in shown.stderr
