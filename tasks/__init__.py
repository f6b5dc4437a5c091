"""The Celery layer: the app, and thin tasks that call into directory/."""
