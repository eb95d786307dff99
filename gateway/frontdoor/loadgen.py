"""The benchmark's load generator, run as its own process.

Sends ``--requests`` POSTs of prepared OIP bodies with at most
``--concurrency`` in flight (asyncio + httpx, one connection per slot) and
prints one JSON object: counts, wall time, throughput and latency
percentiles. Being a separate process, its own CPU use is not charged to the
server it measures (both still share this machine's cores).

Run: ``python -m gateway.frontdoor.loadgen --url URL --bodies FILE ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np


async def drive(
    url: str,
    bodies: list[bytes],
    requests: int,
    concurrency: int,
    headers: dict[str, str],
    warmup: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Send ``warmup`` unmeasured requests, then ``requests`` measured ones.

    Returns
    -------
    dict
        ``requests``, ``ok``, ``statuses`` (status -> count; 0 for no HTTP
        answer), ``failures`` (exception type -> count), ``seconds``,
        ``throughput_rps`` (measured requests / wall seconds) and ``p50_ms``,
        ``p99_ms``, ``mean_ms`` over every measured request, failed ones too.
    """
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency
    )
    all_headers = {"Content-Type": "application/json", **headers}
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        failures: dict[str, int] = {}

        async def run(count: int, offset: int) -> tuple[list[float], dict[int, int]]:
            latencies: list[float] = []
            statuses: dict[int, int] = {}
            next_index = 0

            async def slot() -> None:
                nonlocal next_index
                while next_index < count:
                    index = next_index
                    next_index += 1
                    body = bodies[(offset + index) % len(bodies)]
                    started = time.perf_counter()
                    try:
                        response = await client.post(
                            url, content=body, headers=all_headers
                        )
                        status = response.status_code
                    except httpx.HTTPError as exc:
                        # Status 0: no HTTP answer; the exception type says why.
                        status = 0
                        kind = type(exc).__name__
                        failures[kind] = failures.get(kind, 0) + 1
                    latencies.append(time.perf_counter() - started)
                    statuses[status] = statuses.get(status, 0) + 1

            await asyncio.gather(*(slot() for _ in range(min(concurrency, count))))
            return latencies, statuses

        if warmup:
            await run(warmup, 0)
            failures.clear()
        started = time.perf_counter()
        latencies, statuses = await run(requests, warmup)
        seconds = time.perf_counter() - started

    lat_ms = np.asarray(latencies) * 1000
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ok": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": failures,
        "seconds": round(seconds, 3),
        "throughput_rps": round(requests / seconds, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "mean_ms": round(float(lat_ms.mean()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--bodies", type=Path, required=True, help="JSON list of request bodies."
    )
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    args = parser.parse_args()
    # The token arrives on stdin, never on the command line (ps shows that).
    token = sys.stdin.readline().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    raw = json.loads(args.bodies.read_text())
    bodies = [json.dumps(b).encode() for b in raw]
    result = asyncio.run(
        drive(
            args.url,
            bodies,
            args.requests,
            args.concurrency,
            headers,
            args.warmup,
            args.timeout_s,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
