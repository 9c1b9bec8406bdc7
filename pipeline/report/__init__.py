"""``bms report``: the original project's analytics over the fact table, as tables and charts.

  - ``queries``: the queries, written once as SQLAlchemy Core expressions, so the same SQL runs
    on SQLite, PostgreSQL and Synapse / SQL Server; ``run_report`` runs them and returns a
    ``Report``.
  - ``render``: a ``Report`` as aligned terminal tables (rich), CSV or JSON.
  - ``html``: a ``Report`` as one self-contained HTML page with inline SVG charts.

Words, everywhere: a **row** is one fact row, a (seat, payment) pair; an **order** (a booking)
is a distinct ``order_id``; a **payment** is a distinct ``payment_id``. The original queries
count rows (``COUNT(*)``), so an order of three seats paid twice counts six times; every table
shows orders next to rows.
"""

from pipeline.report.queries import QUERY_NAMES, Report, Section, fact_table, run_report

__all__ = ["QUERY_NAMES", "Report", "Section", "fact_table", "run_report"]
