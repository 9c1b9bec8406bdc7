"""The subcommands of ``bms``, one module each."""
