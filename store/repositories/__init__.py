"""All database queries, one module per domain. Repositories flush but never commit."""
