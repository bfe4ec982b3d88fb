"""Routers per resource: generation (/sample, /infill), meta (/health, /v1/model, /metrics), pages (/)."""
