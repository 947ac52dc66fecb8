"""`segsafe` subcommands that belong to the core (bench). Each module has add_parser()."""
