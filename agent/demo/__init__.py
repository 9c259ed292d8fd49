"""`meshlet demo`: the whole mesh on one machine, each step judged by what really happened.

run           the orchestration: devstack, the apps, their sidecars, the examples, the steps
apps          the small HTTP services behind the sidecars, recording what they received
mesh          the `meshlet sidecar` processes (one process group) and their readiness
examples      the Istio examples and the `meshlet intentions|routes apply` runs
steps         the steps, each self-checking; capabilities: is a step's feature built
load          bounded traffic with a tick a second; scrape: /metrics -> rate and p99
table, output what is printed
"""
