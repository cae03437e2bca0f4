"""Alembic migrations: the only way the schema is created or changed (see store.admin.upgrade_db)."""
