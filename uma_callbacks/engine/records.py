"""The record type's old home: it lives in :mod:`uma_callbacks.core.records` now.

The engine and the sinks (``integrations``) both know records and neither may import the
other, so the type sits in ``core``; this module keeps the old import path working.
"""

from uma_callbacks.core.records import (  # noqa: F401 (re-exported)
    MEASURED,
    PREFIX,
    SCHEMA,
    STATUSES,
    VALUED,
    Record,
    RecordSchemaError,
    artifact_path,
    check_record_dict,
    log_key,
)
