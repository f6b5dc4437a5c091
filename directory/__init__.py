"""The privacy-safe Matrix user directory: the domain layer (no Celery here)."""
