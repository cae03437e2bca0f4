"""Latency per configured batch size, model kinds, derived jobs.

- results.latency_ms: ``{"<batch>": {"before": ms, "after": ms}}`` for every batch size the job
  measured, replacing the four columns that assumed batch sizes 1 and 64 (their values move over).
- models.kind: ``weights`` (an architecture plus a weights file) or ``program`` (a torch.export
  program); existing rows are weights.
- jobs.parent_id: the job a derived job (``POST /v1/jobs/{id}/select``) starts from.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 13:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_OLD = ("latency_ms_b1_before", "latency_ms_b1_after", "latency_ms_b64_before", "latency_ms_b64_after")


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("latency_ms", JSON, nullable=True))
    results = sa.table(
        "results",
        sa.column("job_id", sa.String),
        sa.column("latency_ms", sa.JSON),
        *(sa.column(name, sa.Float) for name in _OLD),
    )
    conn = op.get_bind()
    for row in conn.execute(sa.select(results)).mappings().all():
        latency = {
            str(b): {"before": row[f"latency_ms_b{b}_before"], "after": row[f"latency_ms_b{b}_after"]}
            for b in (1, 64)
            if row[f"latency_ms_b{b}_before"] is not None or row[f"latency_ms_b{b}_after"] is not None
        }
        conn.execute(
            results.update().where(results.c.job_id == row["job_id"]).values(latency_ms=latency)
        )
    conn.execute(results.update().where(results.c.latency_ms.is_(None)).values(latency_ms={}))
    with op.batch_alter_table("results") as batch:
        batch.alter_column("latency_ms", existing_type=JSON, nullable=False)
        for name in _OLD:
            batch.drop_column(name)

    with op.batch_alter_table("models") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="weights")
        )

    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(length=32), nullable=True))
        batch.create_foreign_key(
            batch.f("fk_jobs_parent_id_jobs"), "jobs", ["parent_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index(batch.f("ix_jobs_parent_id"), ["parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(batch.f("ix_jobs_parent_id"))
        batch.drop_constraint(batch.f("fk_jobs_parent_id_jobs"), type_="foreignkey")
        batch.drop_column("parent_id")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("kind")
    with op.batch_alter_table("results") as batch:
        for name in _OLD:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))
        batch.drop_column("latency_ms")
