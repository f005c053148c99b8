"""Drives the emulator with the official ``fal-client`` package; run as a child process.

``fal_client`` reads ``FAL_QUEUE_RUN_HOST`` when it is imported and always speaks
https, so the parent sets the environment (host, key, SSL_CERT_FILE) and starts us.
Prints one JSON document of what the client saw.
"""

from __future__ import annotations

import json
import sys
import time

import fal_client

ENDPOINT = "fal-ai/flux-pro/kontext/max"


def main() -> None:
    image_url, webhook_url = sys.argv[1], sys.argv[2]
    client = fal_client.SyncClient()
    arguments = {"prompt": "Put a donut next to the flour.", "image_url": image_url, "seed": 11, "num_images": 2, "output_format": "png"}
    handle = client.submit(ENDPOINT, arguments=arguments, webhook_url=webhook_url)
    statuses = []
    for status in handle.iter_events(with_logs=True, interval=0.05):
        statuses.append(type(status).__name__)
    result = handle.get()
    by_id = client.status(ENDPOINT, handle.request_id)
    same_result = client.result(ENDPOINT, handle.request_id) == result

    cancelled = client.submit(ENDPOINT, arguments=arguments)
    client.cancel(ENDPOINT, cancelled.request_id)
    time.sleep(0.1)
    cancelled_status = type(client.status(ENDPOINT, cancelled.request_id)).__name__

    refused = None
    try:
        client.submit(ENDPOINT, arguments={**arguments, "num_images": 9})
    except fal_client.client.FalClientHTTPError as exc:
        refused = {"status": exc.status_code, "message": str(exc)}

    print(
        json.dumps(
            {
                "request_id": handle.request_id,
                "status_url": handle.status_url,
                "statuses": statuses,
                "result": result,
                "status_by_id": type(by_id).__name__,
                "same_result": same_result,
                "cancelled_status": cancelled_status,
                "refused": refused,
            }
        )
    )


if __name__ == "__main__":
    main()
