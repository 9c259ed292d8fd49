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


def main() -> None:
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
    rounds = 50_000

    def per_call(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=rounds, repeat=5)) / rounds

    l7 = per_call(lambda: snap.decide_request(dest, web, request))
    l4 = per_call(lambda: snap.decide_connection(dest, l4_source))
    count = sum(len(e.sources) for e in loaded)
    print(
        f"{count:,} intentions: snapshot build best of 5 {builds[0][0] * 1e3:.1f} ms "
        f"(CPU {builds[0][1] * 1e3:.1f} ms), median {builds[2][0] * 1e3:.1f} ms, "
        f"first {first[0] * 1e3:.1f} ms"
    )
    print(f"L7 decision through 3 permissions: {l7 * 1e6:.2f} us")
    print(f"L4 decision: {l4 * 1e6:.2f} us")


if __name__ == "__main__":
    main()
