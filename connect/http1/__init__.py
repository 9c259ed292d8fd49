"""The HTTP/1.1 sidecar path: httptools (llhttp) framing, keep-alive both sides, streamed
bodies, per-request authorization, pooled upstream connections.

* `exchange`: one request and its response as a pure state whose decisions return actions
  (forward, answer, retry on another endpoint, close), with the `RetryPolicy`.
* `downstream`: the client connection's protocol; thin parser callbacks that drive exchanges.
* `upstream`: the upstream connection's protocol, and the idle pool per endpoint.
* `origin`: where requests go (`AppOrigin`, `MeshOrigin` over a connect.cluster).
* `listener`: `OutboundHTTP` and `InboundHTTP`.
"""

from connect.http1.limits import HTTPLimits
from connect.http1.listener import InboundHTTP, OutboundHTTP
from connect.http1.origin import AppOrigin, MeshOrigin

__all__ = ["AppOrigin", "HTTPLimits", "InboundHTTP", "MeshOrigin", "OutboundHTTP"]
