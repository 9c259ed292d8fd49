"""What a filter go-bexpr would reject raises: the type tells which check refused it."""

from __future__ import annotations


class FilterError(ValueError):
    """A filter expression go-bexpr would reject; ``str()`` is go-bexpr's message.

    Consul answers 500 with ``Failed to create boolean expression evaluator: <message>``.
    """


class FilterSyntaxError(FilterError):
    """The expression does not parse (pigeon's ``line:col (offset): ...`` messages)."""


class FilterSchemaError(FilterError):
    """The expression parses but does not fit the filtered type.

    The distinction matters for one endpoint: ``/v1/agent/checks`` creates its filter without a
    data type, so Consul only reports these errors when evaluating, without the ``Failed to
    create boolean expression evaluator:`` prefix, and not at all when there is nothing to filter.
    """
