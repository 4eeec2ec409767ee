"""pipeline: cron-safe stages that keep a transport-routing backend's data fresh.

sync-odata -> gen-virtual -> build-graph feed the routing graph; match-gps turns raw GPS
into cached polylines. Every stage runs through :mod:`pipeline_cli.runner`.
"""

__version__ = "0.1.0"


def main() -> None:
    """The console script: ``pipeline.cli.main``, and until its modules are loaded (a third
    of a second, where a Ctrl-C right after Enter printed a 20-line KeyboardInterrupt
    traceback) a Ctrl-C exits 130 with one line, as it does later."""
    import os
    import signal

    def interrupted(signum: int, frame: object) -> None:
        # Nothing is open or written yet, and an exception raised inside an import can come
        # out as another one (a RuntimeError from __set_name__): leave at once.
        os.write(2, b"pipeline: stopped by SIGINT before it finished\n")  # cli.stopped_line
        os._exit(130)

    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not if ignored
    if ours:
        signal.signal(signal.SIGINT, interrupted)
    from .cli import main as cli_main

    if ours:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli_main()
    finally:  # the result stands: a Ctrl-C while the interpreter shuts down changes nothing
        if ours:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
