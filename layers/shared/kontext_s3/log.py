"""The one Powertools logger every module of the layer writes through.

Its service name comes from ``POWERTOOLS_SERVICE_NAME`` (set per function in the
template), and keys added with ``thread_safe_append_keys`` (job id, object key)
appear on every line a worker thread writes.
"""

import os

from aws_lambda_powertools import Logger

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME") or "kontext-s3")
