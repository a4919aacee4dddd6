"""The ``laser`` command line."""
