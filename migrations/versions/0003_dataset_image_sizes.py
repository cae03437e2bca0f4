"""datasets.image_sizes: the distinct image sizes of an uploaded ImageFolder archive.

A job on an archive whose images differ in size needs ``dataset.image_size``; with the sizes on
the record, ``POST /v1/jobs`` says so at submission instead of the worker failing on the job.
Rows from before stay NULL (unknown: the worker's own check still applies).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 16:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("image_sizes", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("image_sizes")
