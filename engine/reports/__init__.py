"""engine.reports."""
