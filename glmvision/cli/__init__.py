"""The `glmvision` command: its subcommands live in glmvision.cli.main."""
