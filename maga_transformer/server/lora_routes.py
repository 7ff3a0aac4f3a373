"""LoRA routes: rtp-llm's POST /update (the whole wanted set) and vLLM's POST /v1/load_lora_adapter
and /v1/unload_lora_adapter. The engine core does the work (lora/manager.py); requests keep
streaming while an adapter loads. docs/LoRA-Tutorial.md documents bodies, answers and errors."""
from __future__ import annotations

from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from maga_transformer.server import native_api
from maga_transformer.server.context import ServerContext
from maga_transformer.server.openai_api import OpenAIError


def adapter_for_model(ctx: ServerContext, model: Optional[str]) -> Optional[str]:
    """The adapter an OpenAI `model` names: None for the base model (its name, or no name). Other
    names are refused (404) while adapters are served; with none served any name means the base
    model, as before LoRA existed (clients send whatever id they were configured with)."""
    adapters = ctx.engine.adapters
    if model is None or model == ctx.config.model_name or not adapters:
        return None
    if model in adapters:
        return model
    served = ", ".join([ctx.config.model_name] + sorted(adapters))
    raise OpenAIError(f"The model `{model}` does not exist (served: {served})", 404, param="model",
                      err_type="NotFoundError")


def _lora_info(body: Any) -> Dict[str, str]:
    """{"peft_info": {"lora_info": {name: path}}} -> {name: path}, or ValueError saying what is wrong."""
    peft_info = body.get("peft_info") if isinstance(body, dict) else None
    lora_info = peft_info.get("lora_info") if isinstance(peft_info, dict) else None
    if not isinstance(lora_info, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in lora_info.items()):
        raise ValueError('update: expected {"peft_info": {"lora_info": {adapter name: PEFT directory}}}')
    return lora_info


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, RecursionError):
        return None


def _openai_error(message: str, status: int) -> JSONResponse:
    kind = "NotFoundError" if status == 404 else ("BadRequestError" if status < 500 else "InternalServerError")
    return JSONResponse(OpenAIError(message, status, err_type=kind).body(), status_code=status)


def _names(body: Any, need_path: bool) -> Dict[str, str]:
    if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) or not body["lora_name"]:
        raise ValueError("lora_name: expected the adapter's name (a non-empty string)")
    path = body.get("lora_path")
    if need_path and (not isinstance(path, str) or not path):
        raise ValueError("lora_path: expected the PEFT adapter's directory (a non-empty string)")
    return {body["lora_name"]: path or ""}


def register(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/update")
    async def update(request: Request):
        try:
            wanted = _lora_info(await _json(request))
        except ValueError as err:
            return JSONResponse({"error_code": native_api.BAD_INPUT_FORMAT, "message": str(err)}, status_code=400)
        result = await ctx.engine.update_lora("set", wanted)
        if not result.ok:
            code = native_api.BAD_INPUT_FORMAT if result.status < 500 else native_api.UNKNOWN_ERROR
            return JSONResponse({"error_code": code, "message": result.error}, status_code=result.status)
        return {"status": "ok", "lora_info": result.adapters, "loaded": result.loaded, "unloaded": result.unloaded}

    async def change(request: Request, kind: str) -> Any:
        try:
            names = _names(await _json(request), need_path=kind == "load")
        except ValueError as err:
            return _openai_error(str(err), 400)
        result = await ctx.engine.update_lora(kind, names)
        if not result.ok:
            return _openai_error(result.error, result.status)
        name = next(iter(names))
        done = "added" if kind == "load" else "removed"
        return PlainTextResponse(f"Success: LoRA adapter '{name}' {done} successfully.")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await change(request, "load")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await change(request, "unload")
