"""The command line: `iln` and its subcommands, and the entry point shared by the stage scripts."""
