"""dlsn: an experiment suite for single-image super-resolution around DLSN."""

__version__ = "0.1.0"
