"""`a3t serve`: the self-improvement flow as a scheduled Prefect deployment.

Prefect schedules runs only through a server (its temporary in-process server has no
scheduler). With PREFECT_API_URL set, the deployment is registered with that server;
without it, a local server is started on 127.0.0.1 for as long as the deployment is
served (its UI shows the schedule and the runs). Each scheduled run adds rounds after the
campaign's last finished one (``more_rounds``), so a nightly schedule keeps improving.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


@contextmanager
def prefect_server(port: int, startup_timeout_s: float = 120) -> Iterator[str]:
    """The API URL of the user's Prefect server, or of a local one started for the duration."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(url):
            if server.poll() is not None:
                raise RuntimeError(f"the local Prefect server did not start (port {port} in use?):\n"
                                   f"{server.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not answer on {url} within {startup_timeout_s:.0f} s")
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
