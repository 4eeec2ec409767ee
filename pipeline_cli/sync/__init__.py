"""sync-odata's helpers that are not the stage itself: the row checks, canonical form and row
index (``rows``) and the row worker process that applies them to spooled pages (``worker``).
The stage is ``pipeline_cli.stages.sync_odata``.
"""
