"""The server's defaults, each written once (the command line's flags read them from here without
importing the server)."""

DEFAULT_HOST = "127.0.0.1"  # this machine only, unless told otherwise
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (413)
MAX_QUEUE = 256  # waiting requests before 429
SHUTDOWN_TIMEOUT_S = 30.0  # on SIGTERM, seconds running requests get to finish
