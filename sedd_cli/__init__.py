"""The `sedd` command line: a front end above the library (`sedd_core`), like the HTTP server (`app`)."""
