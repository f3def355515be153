"""Prefect artifacts: what a flow run's page shows beside its logs (links to MLflow runs and Label Studio projects,
the judged answers, the report card).

An artifact made inside a flow or task run is attached to it. Artifacts are a convenience over what is already on
disk and in MLflow, so a Prefect API that cannot take one costs a warning, never the run.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)


def artifact_key(text: str) -> str:
    """Prefect's artifact keys are lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "artifact"


def publish_link(link: str, text: str, *, key: str, description: str = "") -> None:
    from prefect.artifacts import create_link_artifact

    _publish(create_link_artifact, key, link=link, link_text=text, description=description)


def publish_markdown(markdown: str, *, key: str, description: str = "") -> None:
    from prefect.artifacts import create_markdown_artifact

    _publish(create_markdown_artifact, key, markdown=markdown, description=description)


def publish_table(rows: Sequence[Mapping[str, object]], *, key: str, description: str = "") -> None:
    from prefect.artifacts import create_table_artifact

    _publish(create_table_artifact, key, table=[dict(r) for r in rows], description=description)


def _publish(create, key: str, **fields) -> None:
    try:
        with warnings.catch_warnings():  # the demo's card is made after its flows: Prefect 3.9 allows it, and warns
            warnings.filterwarnings("ignore", message="Artifact creation outside of a flow", category=FutureWarning)
            create(key=artifact_key(key), **fields)
    except Exception as e:  # noqa: BLE001 - see the module docstring
        logger.warning("no Prefect artifact %r (%s)", key, e)
