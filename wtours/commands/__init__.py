"""The command layer: one ``cli_main(args) -> int`` per ``wtours`` subcommand (reads the parsed arguments,
calls the library, prints, returns the exit status). Library code never imports it; :mod:`wtours.cli` is
argparse and dispatch only."""
