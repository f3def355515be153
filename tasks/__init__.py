"""Units of work (Prefect tasks and their helpers): the only layer that talks to Ray, MLflow, Label Studio and outside files."""
