"""The `Meta` keys of a service-router that carry Istio route features Consul has no field for:
`meshlet.io/route.<n>.<feature>`, n the route's index in `Routes`. `meshlet routes translate`
writes them (traffic.from_istio) and meshlet's proxy reads them (connect.chain_routes); other
Consul proxies ignore them."""

from __future__ import annotations

from typing import Final

META_PREFIX: Final = "meshlet.io/"
META_ROUTE: Final = META_PREFIX + "route."
PER_TRY_TIMEOUT: Final = "per-try-timeout"
FAULT_DELAY: Final = "fault.delay"
FAULT_DELAY_PERCENT: Final = "fault.delay-percent"
FAULT_ABORT_STATUS: Final = "fault.abort-status"
FAULT_ABORT_PERCENT: Final = "fault.abort-percent"
MIRROR: Final = "mirror"
MIRROR_PERCENT: Final = "mirror-percent"
ROUTE_FEATURES: Final = frozenset(
    {
        PER_TRY_TIMEOUT,
        FAULT_DELAY,
        FAULT_DELAY_PERCENT,
        FAULT_ABORT_STATUS,
        FAULT_ABORT_PERCENT,
        MIRROR,
        MIRROR_PERCENT,
    }
)
