"""A static before/after page of the jobs under an output prefix: ``kontext-s3 gallery [PREFIX] --out DIR``.

For each job: the input beside its outputs, the prompt and fields, the status,
times, and a link to ``manifest.json`` or ``error.json``. No server and no
script: the page is one HTML file that works when opened from disk. Images are
either copied next to it (``--images copy``, the default, for a page that keeps
working) or linked through presigned URLs (``--images presign``, for a quick
look without downloading; the links expire).

Everything that comes from uploads (keys, prompts, error messages, fields) is
escaped: the page shows it as text and runs none of it. Copies are only of
JPEG, PNG, GIF and WebP images (judged from their first bytes, never a key or a
Content-Type) of at most :data:`MAX_COPY_BYTES`, streamed to disk and named by
their type (``input.jpg``): an SVG kept as uploaded runs its script when opened
on its own, and the uploads refused as too big are exactly the ones that get a
record, so they must not be fetched. Anything else is a placeholder saying why.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from botocore.exceptions import BotoCoreError, ClientError

from kontext_s3.image_types import SNIFF_BYTES, sniff_image

if TYPE_CHECKING:
    from kontext_s3_tools.cli import Target

PRESIGN_SECONDS = 3600
MAX_JOBS = 500
#: The largest object the gallery copies to disk; bigger ones are placeholders, and are never read.
MAX_COPY_BYTES = 25 * 1024 * 1024
#: Bytes held in memory at once while a copy streams to disk.
_CHUNK_BYTES = 1024 * 1024
#: The types a browser only ever draws (never runs), and the extension a copy of each is named by.
_COPIED_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}
#: The error code of an upload the pipeline refused as it is (not an image we take, or too big): not worth fetching.
_REFUSED_INPUT = "unsupported_object"
_NOT_AVAILABLE = "not available"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class GalleryError(Exception):
    """A mistake the person running the command can fix; the message says how."""


@dataclass
class GalleryJob:
    job_id: str
    output_prefix: str
    succeeded: bool
    document: dict[str, Any]
    record_key: str
    #: (caption, S3 key, version id or None) of the input and each output.
    input_image: tuple[str, str, str | None] | None = None
    outputs: list[tuple[str, str, str | None]] = field(default_factory=list)

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.document.get("input") or {})

    @property
    def prompt(self) -> str:
        return str(self.fields.get("prompt") or (self.document.get("recipe") or {}).get("fields", {}).get("prompt") or "")

    @property
    def refused_input(self) -> str | None:
        """Why the pipeline refused the upload itself, when the error record says it did; else ``None``."""
        if self.succeeded or self.document.get("code") != _REFUSED_INPUT:
            return None
        return f"not shown: the upload was refused: {self.document.get('message') or _REFUSED_INPUT}"


@dataclass(frozen=True)
class Withheld:
    """An image the page shows as a placeholder, and why (the reason is shown, escaped)."""

    reason: str


def find_jobs(target: Target, prefix: str = "") -> list[GalleryJob]:
    """Every job with a manifest or an error record under ``<output prefix><prefix>``, newest first."""
    s3 = target.client("s3")
    under = target.output_prefix + prefix.lstrip("/").removeprefix(target.output_prefix)
    records: list[tuple[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=under):
        for item in page.get("Contents", []):
            if item["Key"].endswith(("/manifest.json", "/error.json")):
                records.append((item["Key"], item["LastModified"]))
    records.sort(key=lambda pair: pair[1], reverse=True)
    jobs: dict[str, GalleryJob] = {}
    for key, _ in records[: MAX_JOBS * 2]:
        output_prefix = key.rsplit("/", 1)[0] + "/"
        if output_prefix in jobs and jobs[output_prefix].succeeded:
            continue  # a manifest wins over a stale error record
        try:
            document = json.loads(s3.get_object(Bucket=target.bucket, Key=key)["Body"].read())
            source = document.get("source") or {}
            if not isinstance(document, dict) or not isinstance(source, dict):
                raise ValueError("not a kontext-s3 record")
        except (ValueError, ClientError) as exc:
            print(f"warning: skipped {key}: {exc}", file=sys.stderr)
            continue
        succeeded = key.endswith("/manifest.json")
        claimed = str(document.get("job_id") or "")
        job = GalleryJob(
            # The id names a folder on disk: only a real job id is used, anything else is replaced by a hash.
            job_id=claimed if _JOB_ID.match(claimed) else hashlib.sha256(output_prefix.encode()).hexdigest()[:32],
            output_prefix=output_prefix,
            succeeded=succeeded,
            document=document,
            record_key=key,
            input_image=("input", str(source["key"]), source.get("version_id")) if source.get("key") else None,
            outputs=[
                (f"output {i + 1}", str(image["key"]), None) for i, image in enumerate(document.get("images", []) if succeeded else [])
            ],
        )
        jobs[output_prefix] = job
    return list(jobs.values())[:MAX_JOBS]


class _Links:
    """Where the page points for an S3 object: a copy beside it, or a presigned URL."""

    def __init__(self, target: Target, out: Path, mode: str) -> None:
        self._s3 = target.client("s3")
        self._bucket = target.bucket
        self._out = out
        self._mode = mode

    def image(self, job: GalleryJob, key: str, version_id: str | None, stem: str) -> str | Withheld:
        """A link to the image, or why there is none; a copy is ``media/<job>/<stem>.<its type's extension>``."""
        extra = {"VersionId": version_id} if version_id else {}
        if self._mode == "presign":
            return self._presigned(key, extra)
        try:
            response = self._s3.get_object(Bucket=self._bucket, Key=key, **extra)
        except ClientError:
            return Withheld(_NOT_AVAILABLE)  # the input was deleted since, say: the page says so instead of showing a broken image
        body = response["Body"]
        try:
            return self._copy(body, int(response.get("ContentLength") or 0), Path("media") / job.job_id / stem)
        except BotoCoreError:
            return Withheld(_NOT_AVAILABLE)  # the connection broke mid-copy: what was written is gone
        finally:
            body.close()  # unread bytes of a refused object are dropped with the connection, not read

    def record(self, job: GalleryJob, name: str) -> str:
        """A link to the job's manifest or error record; a copy is written from the record already read, not fetched again."""
        if self._mode == "presign":
            return self._presigned(job.record_key, {})
        relative = Path("media") / job.job_id / name
        self._write(relative, [json.dumps(job.document, indent=2, ensure_ascii=False).encode()])
        return quote(relative.as_posix())

    def _presigned(self, key: str, extra: dict[str, str]) -> str:
        return str(
            self._s3.generate_presigned_url("get_object", Params={"Bucket": self._bucket, "Key": key, **extra}, ExpiresIn=PRESIGN_SECONDS)
        )

    def _copy(self, body: Any, size: int, stem: Path) -> str | Withheld:
        """Stream ``body`` to ``<stem>.<its type's extension>`` if it is a raster image within the cap, judged before writing."""
        if size > MAX_COPY_BYTES:
            return Withheld(_too_large(size))
        first = _read_up_to(body, SNIFF_BYTES)
        extension = _COPIED_EXTENSIONS.get(sniff_image(first) or "")
        if extension is None:
            return Withheld("not copied: not a JPEG, PNG, GIF or WebP image")
        relative = stem.with_name(f"{stem.name}.{extension}")
        # The cap holds even if the body runs past the size S3 announced.
        if not self._write(relative, _capped(chain([first], body.iter_chunks(_CHUNK_BYTES)))):
            return Withheld(_too_large(None))
        return quote(relative.as_posix())

    def _write(self, relative: Path, chunks: Iterable[bytes]) -> bool:
        """Write ``chunks`` to ``out/relative``; ``False`` (and nothing left on disk) when they run over :data:`MAX_COPY_BYTES`."""
        path = self._out / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as file:
                for chunk in chunks:
                    file.write(chunk)
        except _OverCap:
            path.unlink(missing_ok=True)
            return False
        except OSError as exc:
            raise GalleryError(f"error: cannot write into {self._out}: {exc.strerror}; choose another --out") from None
        except BaseException:
            path.unlink(missing_ok=True)  # never leave half an image behind
            raise
        return True


class _OverCap(Exception):
    """A body ran past :data:`MAX_COPY_BYTES` while it was being copied."""


def _too_large(size: int | None) -> str:
    what = f"{size} bytes" if size is not None else "larger than announced"
    return f"not copied: {what}; the gallery copies images of at most {MAX_COPY_BYTES} bytes"


def _read_up_to(body: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes from the start of ``body`` (a read may return fewer than asked before the end)."""
    data = b""
    while len(data) < limit:
        chunk = body.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _capped(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` as they come, raising :class:`_OverCap` at the first byte past :data:`MAX_COPY_BYTES`."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > MAX_COPY_BYTES:
            raise _OverCap
        yield chunk


def write_gallery(target: Target, out: Path, *, prefix: str = "", images: str = "copy") -> Path:
    """Write ``out/index.html`` (and, with ``images='copy'``, the images and records beside it)."""
    if images not in ("copy", "presign"):
        raise GalleryError("error: --images is copy or presign")
    jobs = find_jobs(target, prefix)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GalleryError(f"error: cannot write the gallery into {out}: {exc.strerror}; choose another --out") from None
    link = _Links(target, out, images)
    cards = [_card(job, link) for job in jobs]
    page = _PAGE.format(
        title=escape(f"kontext-s3: s3://{target.bucket}/{target.output_prefix}{prefix}"),
        summary=escape(
            f"{len(jobs)} job(s): {sum(j.succeeded for j in jobs)} succeeded, {sum(not j.succeeded for j in jobs)} failed. "
            f"Written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}."
        ),
        cards="\n".join(cards) or "<p>No jobs under this prefix yet.</p>",
    )
    index = out / "index.html"
    try:
        index.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise GalleryError(f"error: cannot write {index}: {exc.strerror}; choose another --out") from None
    return index


def _figure(caption: str, url: str | Withheld, alt: str) -> str:
    if isinstance(url, Withheld):
        return f'<figure class="missing"><div>{escape(url.reason)}</div><figcaption>{escape(caption)}</figcaption></figure>'
    return (
        f'<figure><img src="{escape(url, quote=True)}" alt="{escape(alt, quote=True)}"><figcaption>{escape(caption)}</figcaption></figure>'
    )


def _rows(values: dict[str, Any]) -> Iterator[str]:
    for name, value in values.items():
        if name == "image_url":
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        yield f"<tr><th>{escape(str(name))}</th><td>{escape(text)}</td></tr>"


def _card(job: GalleryJob, link: _Links) -> str:
    doc = job.document
    figures = []
    if job.input_image:
        caption, key, version = job.input_image
        refused = job.refused_input
        figures.append(_figure(caption, Withheld(refused) if refused else link.image(job, key, version, "input"), f"input {key}"))
    for i, (caption, key, version) in enumerate(job.outputs):
        figures.append(_figure(caption, link.image(job, key, version, f"output-{i + 1}"), f"{caption} of {job.job_id}"))
    record_name = job.record_key.rsplit("/", 1)[-1]  # manifest.json or error.json: find_jobs takes no other
    record_url = link.record(job, record_name)
    source = doc.get("source") or {}
    times = {"uploaded": doc.get("uploaded_at"), "sent to fal": doc.get("submitted_at"), "recorded": doc.get("at")}
    timings = (doc.get("output") or {}).get("timings") or {}
    status = "succeeded" if job.succeeded else f"failed: {doc.get('code', 'error')}"
    error = ""
    if not job.succeeded:
        problems = "".join(
            f"<li>{escape(str(p.get('field')))}: {escape(str(p.get('message')))}</li>"
            for p in doc.get("problems") or []
            if isinstance(p, dict)
        )
        error = f'<div class="error"><p>{escape(str(doc.get("message", "")))}</p>{f"<ul>{problems}</ul>" if problems else ""}</div>'
    recipe = doc.get("recipe") or None
    recipe_line = (
        f'<p class="recipe">recipe {escape(str(recipe.get("key")))} (version {escape(str(recipe.get("version_id")))})</p>' if recipe else ""
    )
    return f"""<section class="job {"ok" if job.succeeded else "failed"}" id="job-{escape(job.job_id, quote=True)}">
<h2><span class="status">{escape(status)}</span> {escape(str(source.get("key", job.output_prefix)))}</h2>
<p class="prompt">{escape(job.prompt)}</p>
{error}
<div class="images">{"".join(figures)}</div>
<details><summary>fields, times and record</summary>
<table>{"".join(_rows({k: v for k, v in job.fields.items() if k != "prompt"}))}
{"".join(_rows({k: v for k, v in times.items() if v}))}
{"".join(_rows({f"fal {k}": v for k, v in timings.items()}))}
<tr><th>job</th><td>{escape(job.job_id)}</td></tr></table>
{recipe_line}
<p><a href="{escape(record_url or "#", quote=True)}">{escape(record_name)}</a></p>
</details>
</section>"""


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src * data: file:; style-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
.job {{ border: 1px solid #ddd; border-radius: 8px; padding: 1em; margin: 1em 0; }}
.job.failed {{ border-color: #d33; background: #fff6f6; }}
.status {{ font-size: 0.8em; padding: 0.1em 0.5em; border-radius: 4px; background: #2a2; color: #fff; }}
.failed .status {{ background: #d33; }}
.prompt {{ font-style: italic; white-space: pre-wrap; }}
.images {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} figure img {{ max-width: 320px; max-height: 320px; display: block; border: 1px solid #ccc; }}
.missing div {{ width: 160px; height: 120px; background: #eee; display: flex; align-items: center; justify-content: center; }}
.error {{ color: #a00; }} table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 0.1em 0.6em; }}
</style></head>
<body><h1>{title}</h1><p>{summary}</p>
{cards}
</body></html>
"""
