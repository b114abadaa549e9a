"""One module per `pitchkeras` subcommand; see `pitchkeras.cli`."""
