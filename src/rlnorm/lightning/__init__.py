"""The Lightning integration: ``NormalizerCallback`` and its drift telemetry."""
