"""Test-suite package, so shared helpers import as ``tests.<module>``."""
