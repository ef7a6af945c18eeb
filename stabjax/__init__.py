"""stabjax: training under controlled stabilization and measuring degeneration."""

__version__ = "0.1.0"
