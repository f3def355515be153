"""Prefect flows, one per stage plus the pipeline: each reads like a recipe.

Importing `tasks` first points Prefect, Ray and MLflow at the state directory before Prefect reads its settings.
"""

import tasks  # noqa: F401
