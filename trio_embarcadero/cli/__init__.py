"""The ``trio-embarcadero`` command line.

``main(argv) -> int`` returns the exit status: 0 after a clean run (a broker
that drained after SIGINT/SIGTERM), 1 on a runtime failure (also a broker
that drained and stopped because its disk log failed), 2 on a usage or
configuration error. Only this package configures logging and signals; the
library never does.

* :mod:`.parser`: the commands and their options;
* :mod:`.main`: loads the config and runs the command;
* :mod:`.logs`: how the command line logs;
* :mod:`.serving`: ``serve`` and ``cluster``, until a signal;
* :mod:`.clients`: the client commands (publish, subscribe, topics ...).

A command's module is loaded only when it runs, and the tools (``bench``)
only by their command: the broker that ``serve`` starts, and ``import
trio_embarcadero.cli``, never load them.
"""

from .logs import JsonLogFormatter as JsonLogFormatter
from .main import main as main
from .parser import build_parser as build_parser

__all__ = ["JsonLogFormatter", "build_parser", "main"]
