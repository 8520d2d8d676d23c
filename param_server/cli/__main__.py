"""`python -m param_server.cli` is `param-server`."""

from param_server.cli import main

main()
