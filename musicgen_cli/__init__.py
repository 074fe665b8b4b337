"""Command-line tools and audio file I/O around musicgen_core (the core itself does no I/O)."""
