"""The Dagster instance's settings (``DAGSTER_HOME/dagster.yaml``) written from the config.

Kept apart from the runner so that commands which only need the instance (``unclip ui``)
start and exit without importing the pipeline's stages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from unclip.pipelines.config import PipelineConfig

MARKER = "# written by unclip from the config's `instance` section; edit that, not this file\n"


def dagster_home(cfg: PipelineConfig) -> str:
    """``DAGSTER_HOME``, else ``instance.home``, else ``<storage>/dagster`` (local roots)."""
    home = os.environ.get("DAGSTER_HOME") or cfg.instance.home
    if not home:
        if "://" in cfg.storage:
            home = str(Path.home() / ".unclip" / "dagster")
        else:
            home = os.path.join(cfg.storage, "dagster")
    os.makedirs(home, exist_ok=True)
    settings = Path(home, "dagster.yaml")
    text = dagster_yaml(cfg)
    # A dagster.yaml someone wrote by hand is theirs: only ours is regenerated.
    if not settings.exists() or (
        settings.read_text().startswith(MARKER) and settings.read_text() != text
    ):
        settings.write_text(text)
    return home


def dagster_yaml(cfg: PipelineConfig) -> str:
    """The instance settings: SQLite under DAGSTER_HOME, or Postgres when configured."""
    doc: dict[str, Any] = {
        "telemetry": {"enabled": False},
        # Source runs share one Ray: the daemon starts them one at a time.
        "run_queue": {"tag_concurrency_limits": [{"key": "unclip/source", "limit": 1}]},
    }
    pg = cfg.instance.postgres
    if pg is not None:
        doc["storage"] = {
            "postgres": {
                "postgres_db": {
                    "hostname": pg.hostname,
                    "port": pg.port,
                    "db_name": pg.db_name,
                    "username": pg.username,
                    "password": {"env": pg.password_env},
                    # dagster-postgres ships psycopg2; SQLAlchemy 2.1's default driver is psycopg 3.
                    "scheme": "postgresql+psycopg2",
                }
            }
        }
    return MARKER + yaml.safe_dump(doc, sort_keys=False)
