"""The `sedd` command line: a front end above the library (`sedd_core`), like the HTTP server (`app`).

Each module registers its subcommands without importing torch or the library, so `sedd --help`
answers at once; a command imports what it needs when it runs. Model options come from one settings
model (`app.settings.ModelSettings`): flags over SEDD_* variables, read the same way as the server.
"""
