"""Shared test configuration.

The real-server fixtures (PostgreSQL 15 and 18 with TLS, one role per
authentication method, pgbouncer) live in ``tests/servers.py``.  It is loaded
as the top-level module ``servers`` (``tests/`` is on ``sys.path`` and has no
``__init__.py``), the same name mypy gives it.
"""

from __future__ import annotations

pytest_plugins = ["servers", "secret_watch"]
