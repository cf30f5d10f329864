"""A local Stripe API (localstripe) for contract tests of farebox's Stripe rail.

``localstripe`` starts one localstripe server per test process (so one per xdist worker) and
stops it by process id at the end of the session. It is not started with ``python -m localstripe``
as is, because that entry point (localstripe 1.15.10, ``server.start``):

* listens on ``::`` (every interface, IPv4 and IPv6) with no option to choose the address;
* reads ``localstripe.pickle`` in the system temp directory at start unless given ``--from-scratch``, and writes the whole
  store to that one fixed path after every change and every POST/PUT/DELETE, with no option to
  turn it off (several workers would share and overwrite that file).

So a few lines given to ``python -c`` import ``localstripe.server``, turn persistence off by
replacing ``Store.dump_to_disk`` and ``Store.try_load_from_disk`` with no-ops, bind 127.0.0.1 on
port 0 (the kernel picks a free port: no race between choosing and binding it), print the port and
serve ``localstripe.server.app`` with aiohttp. Nothing is written to disk except the server's own
output, kept in a pytest temporary directory (also its working directory).

Clearing: localstripe has a flush route, ``DELETE /_config/data`` (no authentication), which empties
its whole in-memory store. ``stripe_client`` calls it before every test, so each test starts from an
empty store. Each worker has its own server and runs its tests one at a time, so a flush never
touches another test's objects. Webhooks registered with ``POST /_config/webhooks/{id}`` live
outside the store and are not cleared by it.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

__all__ = ["API_KEY", "LAUNCHER", "START_TIMEOUT", "LocalStripe", "wait_until_up"]

API_KEY = "sk_test_farebox_contract"
START_TIMEOUT = 20.0

LAUNCHER = """
import socket, sys
from aiohttp import web
from localstripe import resources, server
resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
web.run_app(server.app, sock=sock, print=None, access_log=None)
"""


@dataclass(frozen=True)
class LocalStripe:
    """A running localstripe server."""

    url: str
    pid: int
    http: httpx.Client

    def clear(self) -> None:
        """Empty localstripe's whole store (``DELETE /_config/data``)."""
        self.http.delete(f"{self.url}/_config/data").raise_for_status()


def wait_until_up(proc: subprocess.Popen[bytes], out: Path, err: Path, http: httpx.Client) -> str:
    """The server's base URL once it answers (its port read from ``out``); fails the test if it
    exits or stays silent for :data:`START_TIMEOUT` seconds."""
    deadline = time.monotonic() + START_TIMEOUT
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"localstripe exited with code {proc.returncode} at start:\n"
                f"{err.read_text(errors='replace')}"
            )
        if url is None:
            line = out.read_text().strip()
            if line:
                url = f"http://127.0.0.1:{int(line)}"
        if url is not None:
            try:
                response = http.get(f"{url}/v1/balance", auth=(API_KEY, ""))
            except httpx.TransportError:
                pass
            else:
                if response.status_code == 200:
                    return url
        time.sleep(0.05)
    pytest.fail(
        f"localstripe did not answer within {START_TIMEOUT}s:\n{err.read_text(errors='replace')}"
    )
