"""The assistant's local web page (``lightning assist --ckpt RUN --serve``; the ``web`` extra).

A small FastAPI app rather than Gradio: the page is one HTML form rendered on the server from the
very :class:`~tasks.assistant.core.Response` the Python API returns (so what the page shows is the
API's answer, testable without a browser), it needs no JavaScript, and FastAPI + uvicorn install in
seconds with nothing fetched at run time (Gradio brings a large front end of its own and sends usage
analytics unless told not to).

    GET  /             the page            POST /            the page with the answers
    POST /api/answer   the same answers as JSON (Response.to_dict(), file paths as /files/ URLs)
    GET  /files/NAME   a generated image or clip         GET /health   the heads, the precision

Bound to 127.0.0.1 by default. Uploads above ``max_upload_mb`` get a 413 with a message; a file
that is not an image or a clip, a damaged one, an empty sentence, a head the checkpoint lacks:
a 400 with the message on the page. Anything unexpected is logged and answered with a 500 page;
the server keeps serving. Requests reach the model one at a time (``Assistant.lock``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from string import Template
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from tasks.assistant.core import Assistant
from tasks.assistant.inputs import InputError, sniff

log = logging.getLogger(__name__)
PAGE = Template((Path(__file__).with_name("page.html")).read_text(encoding="utf-8"))


class TooLarge(Exception):
    pass


def create_app(assistant: Assistant, max_upload_mb: float = 20.0) -> FastAPI:
    """The FastAPI app serving ``assistant``."""
    app = FastAPI(title="multimodal assistant", docs_url=None, redoc_url=None)
    limit = int(max_upload_mb * 1024 * 1024)
    out_dir = assistant.out_dir.resolve()
    classes = sorted({n for h in assistant.generators.values() if h.class_names is not None for n in h.class_names.names})
    summary = (f"{len(assistant.tasks)} heads: " + ", ".join(f"{t} ({k})" for t, k in assistant.tasks.items())
               + f"; {assistant.precision}")

    async def ask(request: Request) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Parse the form and ask the assistant: (status, response or error dict, the form's fields)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 65536:
            if int(declared) <= 16 * limit:  # read and drop it, so the client sees the answer, not a reset
                async for _ in request.stream():
                    pass
            return 413, {"error": f"the upload is {int(declared) / 2**20:.1f} MB; the limit is {max_upload_mb:g} MB"}, {}
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as err:  # a malformed multipart body
            return 400, {"error": f"could not read the form: {err}"}, {}
        fields = {k: str(form.get(k) or "") for k in ("text", "label")}
        fields["chain"] = "checked" if form.get("chain") else ""
        upload = form.get("file")
        data, filename = b"", ""
        if upload is not None and not isinstance(upload, str):
            filename = upload.filename or ""
            data = await upload.read(limit + 1)
            if len(data) > limit:
                return 413, {"error": f"{filename or 'the upload'} is larger than the {max_upload_mb:g} MB limit"}, fields
        try:
            if filename or data:
                kind = sniff(data, filename)
                kwargs = {kind: data}
            elif fields["label"].strip():
                kwargs = {"label": fields["label"].strip()}
            elif "text" in form:
                kwargs = {"text": fields["text"]}
            else:
                raise InputError("give an image or a clip, a sentence, or a class")
            response = await run_in_threadpool(assistant, **kwargs, chain=bool(fields["chain"]))
        except InputError as err:
            return 400, {"error": str(err)}, fields
        except Exception as err:  # a bug must not take the server down: logged, answered
            log.exception("assistant failed on %s", filename or fields)
            return 500, {"error": f"internal error ({type(err).__name__}: {err}); the server keeps serving"}, fields
        result = response.to_dict()
        if filename:
            result["value"] = filename
            fields["preview"] = _preview(kwargs.get("image"), kwargs.get("audio"))
        return 200, _with_urls(result, out_dir), fields

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(_page(summary, classes, {}, ""))

    @app.post("/", response_class=HTMLResponse)
    async def answer_page(request: Request) -> HTMLResponse:
        status, result, fields = await ask(request)
        body = _error(result["error"]) if "error" in result else _render(result, fields.get("preview", ""))
        return HTMLResponse(_page(summary, classes, fields, body), status_code=status)

    @app.post("/api/answer")
    async def answer_json(request: Request) -> JSONResponse:
        status, result, _ = await ask(request)
        return JSONResponse(result, status_code=status)

    @app.get("/files/{name}")
    def files(name: str) -> Any:
        path = (out_dir / name).resolve()
        if path.parent != out_dir or not path.is_file():
            return JSONResponse({"error": f"no generated file {name!r}"}, status_code=404)
        return FileResponse(path)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "tasks": assistant.tasks, "precision": assistant.precision}

    return app


def _with_urls(result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    for answer in result["answers"]:
        answer["files"] = [f"/files/{Path(f).name}" for f in answer["files"]]
    result["steps"] = [_with_urls(s, out_dir) for s in result["steps"]]
    return result


def _page(summary: str, classes: list[str], fields: dict[str, str], result: str) -> str:
    e = html.escape
    return PAGE.substitute(summary=e(summary), text=e(fields.get("text", "")), label=e(fields.get("label", "")),
                           chain=fields.get("chain", ""), classes=e(", ".join(classes[:12])), result=result)


def _error(message: str) -> str:
    return f'<div class="error" data-kind="error">{html.escape(message)}</div>'


def _preview(image: bytes | None, audio: bytes | None) -> str:
    """The uploaded input, shown beside its answers (an inline image or a player; 4 MB at most)."""
    data = image if image is not None else audio
    if data is None or len(data) > 4 * 2**20:
        return ""
    uri = "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")
    if image is not None:
        return f'<img class="input-image" src="{uri}" alt="the uploaded image">'
    return f'<audio controls src="{uri}"></audio>'


def _render(result: dict[str, Any], preview: str = "") -> str:
    """A Response dict -> HTML; every value shown carries data-* attributes naming its field."""
    e = html.escape
    parts = [f'<div class="input" data-input="{e(result["input"])}">{preview} {e(result["input"])}: <b>{e(result["value"])}</b>'
             f' <span class="note">({result["seconds"]:.2f} s)</span></div>']
    parts += [f'<div class="note">{e(n)}</div>' for n in result["notes"]]
    parts.append('<div class="answers">')
    for a in result["answers"]:
        body = ""
        if a["kind"] in ("caption", "transcript"):
            body = f'<div class="text" data-field="text">{e(a["text"] or "")}</div>'
        elif a["kind"] == "class":
            body = (f'<div><span class="text" data-field="text">{e(a["text"])}</span> '
                    f'<span class="note">p = {a["probs"][a["text"]]:.2f}</span></div>')
            for name, p in list(a["probs"].items())[:10]:
                body += (f'<div class="bar" data-field="prob" data-name="{e(name)}" data-value="{p}"><span>{e(name)}</span>'
                         f'<span class="track"><span class="fill" style="display:block;width:{100 * p:.1f}%"></span></span>'
                         f'<span>{p:.2f}</span></div>')
        elif a["kind"] == "image":
            body = "".join(f'<img class="gen" data-field="file" src="{e(f)}" alt="{e(a["prompt"] or "")}">' for f in a["files"])
        elif a["kind"] == "audio":
            body = "".join(f'<audio controls data-field="file" src="{e(f)}"></audio>' for f in a["files"])
        prompt = f' of <i>{e(a["prompt"])}</i>' if a.get("prompt") else ""
        notes = "".join(f'<div class="note">{e(n)}</div>' for n in a["notes"])
        parts.append(f'<div class="answer" data-task="{e(a["task"])}" data-kind="{e(a["kind"])}">'
                     f'<h3>{e(a["task"])}: {e(a["kind"])}{prompt} <span class="note">{a["seconds"]:.2f} s</span></h3>'
                     f'{body}{notes}</div>')
    parts.append("</div>")
    for step in result["steps"]:
        parts.append(f'<div class="step">then {_render(step)}</div>')
    parts.append(f'<script type="application/json" id="response">{e(json.dumps(result))}</script>')
    return "".join(parts)


def serve(assistant: Assistant, host: str = "127.0.0.1", port: int = 8765, max_upload_mb: float = 20.0) -> None:
    """Run the page with uvicorn until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can use the model", host)
    print(f"assistant on http://{host}:{port}/ ({', '.join(assistant.tasks)})", flush=True)
    uvicorn.run(create_app(assistant, max_upload_mb), host=host, port=port, log_level="warning")
