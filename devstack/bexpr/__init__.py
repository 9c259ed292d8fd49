"""Consul's ``?filter=`` expression language, as Consul evaluates it.

Consul (every release up to the current one) pins hashicorp/go-bexpr at v0.1.2, the last release
that checks selectors against the Go type of the filtered data when the filter is created. This
package reproduces that release: its grammar (``grammar.peg``, parsed with pigeon's semantics so
that syntax errors carry pigeon's exact text: :mod:`.peg`, :mod:`.grammar`), its compile-time
validation (``validate.go`` and ``field_config.go``: unknown selectors, unsupported operators,
literal coercion through Go's ``strconv`` (:mod:`.strconv`), regular-expression compilation
(:mod:`.regexp`)) and its evaluation rules (``evaluate.go``: any-element semantics through
lists, Go's rules for absent map keys: :mod:`.evaluate`).

The filtered objects are the JSON dicts the devstack renders. A :class:`Schema` describes the Go
type behind that JSON, so that validation can happen once, in :func:`compile_filter`, and
:meth:`Filter.matches` only walks data.
"""

from devstack.bexpr.errors import FilterError, FilterSchemaError, FilterSyntaxError
from devstack.bexpr.evaluate import Filter, check_syntax, compile_filter
from devstack.bexpr.schema import (
    BOOL,
    FLOAT64,
    INT,
    STRING,
    UINT8,
    UINT16,
    IPAddress,
    Kind,
    ListOf,
    MapOf,
    Scalar,
    Schema,
    Struct,
    struct,
)

__all__ = [
    "BOOL",
    "FLOAT64",
    "INT",
    "STRING",
    "UINT8",
    "UINT16",
    "Filter",
    "FilterError",
    "FilterSchemaError",
    "FilterSyntaxError",
    "IPAddress",
    "Kind",
    "ListOf",
    "MapOf",
    "Scalar",
    "Schema",
    "Struct",
    "check_syntax",
    "compile_filter",
    "struct",
]
