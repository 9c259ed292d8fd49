"""Decision cost of the intentions engine with 10,000 intentions (target: under 2 us each).

    .venv/bin/python bench/intentions_engine.py

1,000 destinations x 10 sources; one source per destination is an L7 intention with three
permissions (prefix+method, header, regex). Prints the snapshot build time and the best-of-5
per-call time of an L7 and an L4 decision; the build is timed five times (best and median,
wall and CPU time). Nothing is asserted: this box is shared and noisy.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from typing import Any

from intentions.engine import Identity, compile_snapshot, http_request
from intentions.entries import ServiceIntentions, load_entry


def entries() -> list[ServiceIntentions]:
    out = []
    for i in range(1000):
        sources: list[dict[str, Any]] = [
            {"Name": f"src{j}", "Action": "allow" if j % 2 else "deny"} for j in range(9)
        ]
        sources.append(
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": "/admin", "Methods": ["POST"]}},
                    {"Action": "allow", "HTTP": {"Header": [{"Name": "x-env", "Exact": "prod"}]}},
                    {"Action": "allow", "HTTP": {"PathRegex": "/api/v[0-9]+/.*"}},
                ],
            }
        )
        out.append(
            load_entry({"Kind": "service-intentions", "Name": f"svc{i}", "Sources": sources})
        )
    return out


def measure(rounds: int = 50_000) -> dict[str, float]:
    """Snapshot build for 10,000 intentions, timed five times (best, median and first; wall
    and CPU ms), and per-decision times (us): for `make bench` and for `main`."""
    loaded = entries()
    builds: list[tuple[float, float]] = []
    for _ in range(5):
        wall, cpu = time.perf_counter(), time.process_time()
        snap = compile_snapshot(loaded, default_allow=False)
        builds.append((time.perf_counter() - wall, time.process_time() - cpu))
    first = builds[0]
    builds.sort()
    web, l4_source, dest = Identity("web"), Identity("src3"), Identity("svc500")
    request = http_request("GET", "/api/v2/items?x=1", "svc", {"x-env": "dev"})

    def per_call(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=rounds, repeat=5)) / rounds

    return {
        "intentions": float(sum(len(e.sources) for e in loaded)),
        "compile_ms": builds[0][0] * 1e3,
        "compile_cpu_ms": builds[0][1] * 1e3,
        "compile_median_ms": builds[2][0] * 1e3,
        "compile_first_ms": first[0] * 1e3,
        "decide_l7_us": per_call(lambda: snap.decide_request(dest, web, request)) * 1e6,
        "decide_l4_us": per_call(lambda: snap.decide_connection(dest, l4_source)) * 1e6,
    }


def main() -> None:
    got = measure()
    print(
        f"{got['intentions']:,.0f} intentions: snapshot build best of 5 {got['compile_ms']:.1f} ms "
        f"(CPU {got['compile_cpu_ms']:.1f} ms), median {got['compile_median_ms']:.1f} ms, "
        f"first {got['compile_first_ms']:.1f} ms"
    )
    print(f"L7 decision through 3 permissions: {got['decide_l7_us']:.2f} us")
    print(f"L4 decision: {got['decide_l4_us']:.2f} us")


if __name__ == "__main__":
    main()
