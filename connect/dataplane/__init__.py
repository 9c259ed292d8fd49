"""The data-plane process of `meshlet sidecar` and the snapshots the agent feeds it.

    codec      frozen dataclasses <-> JSON-ready values, from their type hints (pure)
    snapshot   the one message the agent pushes: spec, leaf and roots, intentions source,
               routing and endpoints, access-log settings; decoded whole or refused (pure)
    process    the asyncio shell: `python -m connect.dataplane --control-socket PATH ...`

Nothing here imports the agent, aiohttp, cryptography, msgspec or yaml: a data-plane process
loads only what forwarding needs (a test checks its modules).
"""
