"""The heatmap pictures: a study's thumbnail (the Secondary Capture of its finding's image) and each SC
as PNG, read from the outbox."""

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from web.context import WebContext
from web.worklist import render_png, top_sc_uid


def router(context: WebContext) -> APIRouter:
    pictures = APIRouter(include_in_schema=False)
    worklist, settings = context.worklist, context.settings

    def sc_png(study_uid: str, sc_uid: str, max_side: int) -> Response:
        row = worklist.row(study_uid)
        known = (
            row is not None
            and row.result is not None
            and any(image.sc_uid == sc_uid for image in row.result.images or [])
        )
        path = worklist.output_path(study_uid, sc_uid)
        if not known or not path.exists():
            raise HTTPException(404, "no such heatmap")
        return Response(
            render_png(path, max_side), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    @pictures.get("/studies/{study_uid}/thumbnail.png")
    def thumbnail(study_uid: str):
        row = worklist.row(study_uid)
        sc_uid = top_sc_uid(row.result) if row is not None and row.result is not None else None
        if sc_uid is None:
            raise HTTPException(404, "no heatmap")
        return sc_png(study_uid, sc_uid, settings.web.thumbnail_px)

    @pictures.get("/studies/{study_uid}/images/{sc_uid}.png")
    def image(study_uid: str, sc_uid: str):
        return sc_png(study_uid, sc_uid, settings.worker.sc_max_long_side)

    return pictures
