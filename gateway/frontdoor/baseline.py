"""The benchmark's baseline: the same skops model served straight over HTTP.

A minimal Open Inference Protocol v2 server (FastAPI under uvicorn) that loads
the model in-process and answers ``POST /v2/models/{name}/infer`` with
``probabilities`` and ``label``, exactly as the workers shape an ``allow``
answer, with no key check, Kafka, counters or detectors. It exists to show
what the gateway costs; it is not a way to serve models.

Run: ``python -m gateway.frontdoor.baseline --models-dir DIR --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

from gateway.frontdoor.schemas import InferRequestBody
from gateway.frontdoor.tensors import to_array
from gateway.models import ServedModel, load_model
from gateway.protocol import tensor_from_array


def create_baseline_app(model: ServedModel) -> FastAPI:
    """An OIP v2 app serving ``model`` directly."""
    app = FastAPI(title="baseline OIP v2 server")
    spec = model.signature.inputs[0]

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, body: InferRequestBody) -> JSONResponse:
        if model_name != model.name:
            raise HTTPException(404, "unknown model")
        rows = to_array(body.inputs[0], spec).astype(np.float32)
        rows = rows.reshape(-1, spec.row_size)
        # Off the loop, as the worker runs its model.
        proba = await asyncio.get_running_loop().run_in_executor(
            None, model.predict_proba, rows
        )
        labels = proba.argmax(axis=1).astype(np.int64)
        outputs: list[dict[str, Any]] = [
            {
                "name": t.name,
                "shape": t.shape,
                "datatype": t.datatype,
                "data": t.data,
            }
            for t in (
                tensor_from_array("probabilities", proba),
                tensor_from_array("label", labels),
            )
        ]
        return JSONResponse(
            {
                "id": body.id or "",
                "model_name": model.name,
                "model_version": model.signature.version,
                "outputs": outputs,
                "parameters": {"action": "allow"},
            }
        )

    return app


def main() -> None:
    import uvicorn
    from threadpoolctl import threadpool_limits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The same single-threaded BLAS as the worker, so the model costs the same.
    threadpool_limits(1)
    model = load_model(args.models_dir, args.model)
    uvicorn.run(
        create_baseline_app(model),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
