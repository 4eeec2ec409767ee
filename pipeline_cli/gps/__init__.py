"""Where a GPS point goes: files are parsed (``files``), cut into per-device batches
(``batches``), claimed and matched by a pool of workers (``workers``) through OSRM, and the
chunk answers stitched into polylines (``stitching``). The stages are in ``pipeline_cli.stages``.
"""
