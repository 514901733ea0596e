"""DuckDB projections over the event log: energy, revenue, degradation, ROI."""
