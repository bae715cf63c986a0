"""grainflow: a distributed engine that turns micrograph archives into measurements."""

__version__ = "0.1.0"
