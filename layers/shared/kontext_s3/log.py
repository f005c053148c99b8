"""The one Powertools logger every module of the layer writes through.

Its service name comes from ``POWERTOOLS_SERVICE_NAME`` (set per function in the
template), and keys added with ``thread_safe_append_keys`` (job id, object key)
appear on every line a worker thread writes. Tracebacks are redacted as every
other logged value is (``redact``): an exception's text may quote a presigned
URL, and ``logger.exception`` writes it whole.
"""

from __future__ import annotations

import json
import os
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

from kontext_s3.redact import redact


class RedactingFormatter(LambdaPowertoolsFormatter):
    """Powertools' JSON lines, with the exception's text and its stack trace redacted before they are written."""

    def serialize(self, log: Any) -> str:
        for name in ("exception", "stack_trace"):
            if log.get(name):
                # As text first: the stack trace holds the exception object itself, written with str() later.
                log[name] = redact(json.loads(json.dumps(log[name], default=str)))
        return super().serialize(log)


logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME") or "kontext-s3", logger_formatter=RedactingFormatter())
