"""One module per `pitchkeras` subcommand; see `pitchkeras.cli`.

`prepare`, `import_model` (`import`), `export`, `finetune`, `plan`, `generate`, `report`, `populate`, `store`,
`serve`, `client` and `demo`; `options`: the flags several subcommands share, with defaults from the config
dataclasses.
"""
