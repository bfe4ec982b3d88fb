"""The HTTP server for SEDD models: validation, routing, streaming and settings over `sedd_core`.

`create_app` in `app.main` builds the FastAPI application; `sedd serve` runs it under uvicorn.
"""
