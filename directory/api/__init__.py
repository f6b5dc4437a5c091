"""The HTTP API (Starlette): appservice ingress, Matrix search, health and metrics."""
