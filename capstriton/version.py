"""The package version, in a leaf module any part of the library can import."""
__version__ = "0.1.0"
