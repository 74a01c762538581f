"""Weight converters: released checkpoints -> our export format (see `__main__`)."""
