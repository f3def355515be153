"""Prefect flows, one per stage plus the pipeline: each reads like a recipe."""
