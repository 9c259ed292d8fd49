"""Compiling a discovery chain takes time and memory polynomial in the entries, whatever they
are. Found while fuzzing the chain compiler (tests/fuzz): splitters that each split between the
same two next splitters (s_i and t_i -> s_i+1 and t_i+1) form a DAG of 2n entries with 2**n
paths. The circular-reference check walked every path, and flattening nested splitters (as
Consul's compiler does) made 2**n legs: 48 small entries, each written on its own, held
devstack's event loop for hours on the last write (each 2 more levels: x4-5 the time; 16
levels took 3.7 s). A chain with more legs than there are 0.01 % units (10,000: a leg's weight
below that is zero) is refused instead."""

from __future__ import annotations

import pytest

from traffic.chain import ChainEntries, CompileRequest, compile_chain
from traffic.defaults import proxy_defaults_from_json
from traffic.entries import load_entry
from traffic.errors import GraphError

HTTP = proxy_defaults_from_json(
    {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}}
)


def _diamonds(levels: int, *, loop: bool = False) -> ChainEntries:
    entries = []
    for i in range(levels):
        for name in (f"s{i}", f"t{i}"):
            splits = [
                {"Weight": 50, "Service": f"s{i + 1}"},
                {"Weight": 50, "Service": "s0" if loop and i == levels - 1 else f"t{i + 1}"},
            ]
            body = {"Kind": "service-splitter", "Name": name, "Splits": splits}
            entries.append(load_entry(body))
    return ChainEntries.of([HTTP, *entries])


# A hang is a failure (pytest-timeout ends it); the original code did not return.
@pytest.mark.timeout(30)
def test_a_dag_of_splitters_is_refused_once_its_legs_outnumber_the_weight_units() -> None:
    with pytest.raises(GraphError) as info:
        compile_chain(CompileRequest("s0", "td"), _diamonds(24))
    assert str(info.value) == (
        'discovery chain "s0" splits into more than 10000 legs once nested splitters are '
        "flattened (a leg's weight is at least 0.01 %)"
    )


@pytest.mark.timeout(30)
def test_a_loop_at_the_bottom_of_a_deep_dag_is_still_found() -> None:
    with pytest.raises(GraphError, match=r"^detected circular reference: \[splitter:s0"):
        compile_chain(CompileRequest("s0", "td"), _diamonds(24, loop=True))


def test_a_chain_within_the_limit_compiles_as_before() -> None:
    chain = compile_chain(CompileRequest("s0", "td"), _diamonds(8))
    (splitter,) = (n for n in chain.nodes.values() if n.type == "splitter")
    assert len(splitter.splits) == 2**8  # Consul's flattening keeps every path as a leg
