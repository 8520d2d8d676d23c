"""The `param-server` command line: the daemon, store administration, the
fleet, federated rounds and the demo. One module per command group; shared
options and helpers are in `common`."""

from param_server.cli import demo, federation, fleet, serve, store, tokens, variants
from param_server.cli.common import parse_size
from param_server.cli.main import main
from param_server.core.errors import ExitCode

__all__ = ["ExitCode", "main", "parse_size"]  # exit statuses: core.errors.ERRORS

# Registered with `main` on import.
_COMMAND_GROUPS = (demo, federation, fleet, serve, store, tokens, variants)
