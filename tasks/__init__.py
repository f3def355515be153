"""Units of work (Prefect tasks and their helpers): the only layer that talks to Ray, MLflow, Label Studio and outside files.

Importing this package first points every service at the state directory (tasks/settings.py).
"""

from tasks.settings import apply_environment

apply_environment()
