"""The HTTP front door: the Open Inference Protocol v2 REST API over Kafka.

``gateway.frontdoor.app.create_app(settings)`` builds the FastAPI app;
``modelgate frontdoor serve`` runs it under uvicorn. See ``docs/frontdoor.md``.
This package file imports nothing, so the CLI loads FastAPI only when needed.
"""
