"""Where schedule plug-ins find :func:`doc`; the typed-field mechanism itself is ``typedtables``,
shared with every other config table."""

from typedtables.fields import (  # noqa: F401  (re-exported for plug-ins)
    check_value,
    doc,
    field_problems,
    field_types,
    increasing_from_one,
    type_name,
)
