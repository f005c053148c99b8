"""A local stand-in for fal's queue API, webhooks, JWKS and file host (see ``server``)."""

from kontext_s3_tools.emulator.server import ENDPOINTS, FalEmulator, Faults
from kontext_s3_tools.emulator.signing import WebhookSigner

__all__ = ["ENDPOINTS", "FalEmulator", "Faults", "WebhookSigner"]
