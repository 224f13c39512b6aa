"""What a soak run reads from the server under test: ``/metrics`` gauges, RSS and ``/health``.

Owns the scraping. RSS comes from ``/proc/<pid>/status`` when the server's pid is given (the
server runs on this machine: the soak only targets loopback), else from the server's
``process_resident_memory_bytes`` (prometheus_client's process collector). Every read is
bounded by the HTTP client's timeout; a read that fails gives None (the check then fails).
"""

from __future__ import annotations

import asyncio
import time

import httpx

from conveyor.errors import InvalidRequestError


class ServerProbe:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str | None,
                 server_pid: int | None):
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.server_pid = server_pid

    async def gauges(self) -> dict[str, float]:
        """Every unlabelled sample of ``/metrics`` by name ({} if it cannot be read)."""
        try:
            response = await self.client.get(self.base_url + "/metrics", headers=self.headers)
        except httpx.HTTPError:
            return {}
        if response.status_code != 200:
            return {}
        return parse_unlabelled(response.text)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until the server runs and queues nothing; False if it did not within the time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            g = await self.gauges()
            if g.get("conveyor:num_requests_running", 1) == 0 \
                    and g.get("conveyor:num_requests_waiting", 1) == 0:
                return True
            await asyncio.sleep(0.5)
        return False

    async def rss(self) -> int | None:
        if self.server_pid is not None:
            return rss_of_pid(self.server_pid)
        value = (await self.gauges()).get("process_resident_memory_bytes")
        return int(value) if value else None

    async def health(self) -> int | None:
        try:
            return (await self.client.get(self.base_url + "/health")).status_code
        except httpx.HTTPError:
            return None


def parse_unlabelled(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            values[name] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return values


def rss_of_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        raise InvalidRequestError(f"cannot read the model list from {base_url}/v1/models; is "
                                  "the server up (and --api-key right)? Or pass --model") from None
