"""Converters: checkpoints from elsewhere become the project's own exports, once
(`python -m utils.convert --help`). Each source format is one module here with an
`add_command(subparsers)` that adds its subcommand; `__main__.COMMANDS` lists them."""
