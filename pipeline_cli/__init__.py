"""pipeline: cron-safe stages that keep a transport-routing backend's data fresh.

sync-odata -> gen-virtual -> build-graph feed the routing graph; match-gps turns raw GPS
into cached polylines. Every stage runs through :mod:`pipeline_cli.runner`.
"""

__version__ = "0.1.0"
