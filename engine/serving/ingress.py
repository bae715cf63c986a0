"""The HTTP ingress: FastAPI routes, API keys, limits, rate, audit, traffic split.

Routes (the OpenAPI schema at /openapi.json documents them):

    GET  /                   the web viewer (engine/serving/viewer.html), no key
    GET  /healthz            liveness and the versions the aliases point at, no key
    GET  /v1/models          bundle, split, versions and label names     scope analyze
    POST /v1/analyze         multipart: image (+ modality, pixel_size_nm, pixel_size_y_nm,
                             dtype, shape)                               scope analyze
    POST /v1/admin/refresh   read the registry's aliases again now       scope admin

Keys come as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (the schema's two
security schemes, either one), checked against the keys file as it is now
(`engine.serving.keys`: a revoked key is refused within a second). Checks run in
this order, before the app reads the body: key (401), scope (403), rate (429 with
Retry-After), Content-Length (413; 411 without one); then the body: media type (415),
fields (422), pixel count (413: as uploaded, and once resampled to the models' pixel
size by the preprocess stage). Every error is JSON (`schemas.ErrorBody`). Every
request, refused ones included, gets one audit line (engine.audit): time, tenant, key
id, route, status, request id, alias and model versions, image sha256 (of a request
refused for its fields too); never pixels. A 401 for a well-formed key that is unknown
or whose secret is wrong logs the key id it claims, with ``key_claimed: true``.

`X-Request-ID` (sent, or made here and returned; at most 128 characters, else 400) picks
the traffic arm (sticky; a client can pick its arm by its id: fine for A/B, no security
boundary). Once an arm is chosen every response names it, errors too: headers
X-Model-Alias and X-Model-Bundle, and `model` in an error's body.

Live settings (split, alias_ttl_s, generation: Serve's user_config) are checked as a
config is at startup (`ServeConfig.with_live_settings`); a wrong one is refused whole,
logged, and shown as /healthz's `settings_error`, and the replica goes on with the
settings it has (a split without production would otherwise fail every health check).

"Before the app reads the body" is not before anything reads it: Serve's HTTP proxy
takes a request's body into memory as it arrives, and these checks run once an ingress
replica takes the request, so with every replica busy a huge upload, keyed or not, sits
in the proxy's memory. Anywhere but loopback the endpoint belongs behind a front proxy
that refuses bodies over `max_body_bytes` itself (cluster/kuberay/rayservice.yaml's
Ingress: nginx's proxy-body-size).
"""


import asyncio
import hashlib
import logging
import math
import threading
import time
import uuid
from importlib import resources
from typing import Any, Optional
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import GrainflowError
from engine.serving.config import ServeConfig
from engine.serving.decode import BadImage, TooLarge, UnsupportedMedia, decode, parse_shape
from engine.serving.keys import split_key
from engine.serving.schemas import ERROR_CODES, MODALITIES, AnalyzeResponse, ErrorBody, Health, ModelsResponse


# a replica's logs: Serve writes the "ray.serve" logger to the replica's log file
_log = logging.getLogger("ray.serve")

# Headers naming the version that answered, on every response once an arm is chosen
MODEL_HEADERS = {
    "X-Model-Alias": {"description": "the alias whose arm answered (production, canary); on every response once an "
                                     "arm is chosen, errors included", "schema": {"type": "string"}},
    "X-Model-Bundle": {"description": "the bundle version that answered, name/version (percent-encoded where not "
                                      "printable ASCII)", "schema": {"type": "string"}},
}


def _errors(*statuses: int, chosen: tuple[int, ...] = ()) -> dict[int, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can refuse with `statuses`; those in
    `chosen` can come after an arm is chosen, so they carry `MODEL_HEADERS`."""
    return {code: {"model": ErrorBody, "description": ERROR_CODES[code],
                   **({"headers": MODEL_HEADERS} if code in chosen else {})} for code in statuses}


# What each route can answer besides 200 (the order of checks: module doc). Every route:
# 400 (X-Request-ID too long) and 500 (the server's fault, with the same JSON body, logged
# and audited). Keyed routes: 401, 403, 429. /v1/analyze, the one taking a body: 411 (no
# Content-Length), 400 (one not a number), 413, 415, 422; 413 (too large once resampled),
# 422 (pixels the preprocess stage cannot tile) and 500 (a stage's failure) after an arm
# is chosen.
_OPEN_ERRORS = _errors(400, 500)
_KEYED_ERRORS = _errors(400, 401, 403, 429, 500)
_ANALYZE_ERRORS = {200: {"headers": MODEL_HEADERS},
                   **_errors(400, 401, 403, 411, 413, 415, 422, 429, 500, chosen=(413, 422, 500))}
_MAX_ATTEMPTS = 3  # a stage replica that dies mid-request: Serve routes the retry to a live one
MAX_REQUEST_ID = 128  # characters of X-Request-ID
MAX_KEY_ID = 64  # characters of a refused key's claimed id that the audit line keeps (ours have 9)

api = FastAPI(
    title="grainflow",
    version="1",
    description="Defects, masks, material, grade and measurements of micrographs, by the grainflow ensemble.",
)
# The two ways to send a key, declared for the schema (and /docs) as alternatives; the
# check itself runs in the middleware below (Authorization: Bearer first).
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key: gf_<key id>_<secret>")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>, the same keys as X-API-Key")


def error_response(status: int, detail: str, request_id: str | None = None,
                   headers: dict[str, str] | None = None, model: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error (`ErrorBody`); model: {alias, bundle} of the arm chosen, if one was."""
    body = ErrorBody(status=status, error=ERROR_CODES.get(status, "error"), detail=detail, request_id=request_id,
                     model=model)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _chosen(request: Request) -> dict[str, str] | None:
    """{alias, bundle} of the arm that answers this request, once `analyze` chose it."""
    return getattr(request.state, "model", None)


def _header_value(text: str) -> str:
    """`text` as an HTTP header value: printable ASCII as it is, else percent-encoded."""
    return text if text.isascii() and text.isprintable() else quote(text, safe="/@:._-")


class RequestError(Exception):
    """Refuse the request with `status` and a message naming the field at fault."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError):
    return error_response(exc.status, exc.detail, getattr(request.state, "request_id", None), model=_chosen(request))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "header"))
        parts.append(f"{where or 'request'}: {e.get('msg')}")
    return error_response(422, "; ".join(parts) or "malformed request", getattr(request.state, "request_id", None),
                          model=_chosen(request))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail), getattr(request.state, "request_id", None),
                          model=_chosen(request))


def _route_path(request: Request) -> str:
    """The path the routes match: without the app's root_path (Serve's route_prefix, a
    proxy's path prefix), which ASGI servers leave at the front of scope["path"]."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def _scope_of(path: str) -> str | None:
    if path.startswith("/v1/admin"):
        return "admin"
    if path.startswith("/v1/"):
        return "analyze"
    return None


# what Starlette's call_next raises when the app sent no response (after a client
# disconnect; a 499 only when the request says the client is gone)
_NOTHING_SENT = "No response returned."


@api.middleware("http")
async def _guard_and_audit(request: Request, call_next):
    """Key, scope, rate and size checks before the app reads the body; one audit line after."""
    ingress: Ingress = request.app.state.ingress
    started = time.perf_counter()
    rid = request.headers.get("x-request-id")
    audit: dict[str, Any] = {"kind": "http", "route": request.url.path, "method": request.method,
                             "tenant": None, "key_id": None, "models": None, "alias": None, "image_sha256": None,
                             "client": request.client.host if request.client else None}
    request.state.audit = audit
    # Serve's proxy gives every request an id (the client's X-Request-ID, else a new
    # one) and returns it in the response's X-Request-ID header.
    too_long = rid is not None and len(rid) > MAX_REQUEST_ID
    rid = (rid or uuid.uuid4().hex)[:MAX_REQUEST_ID]  # the audit log and the body carry at most this much
    request.state.request_id = rid
    try:
        if too_long:  # refused: the id Serve echoes would differ from the one answered and logged
            response = error_response(400, f"X-Request-ID: longer than {MAX_REQUEST_ID} characters", rid)
        else:
            response = ingress.refuse(request, audit) or await call_next(request)
    except asyncio.CancelledError:
        # the client went away, or Serve's request timeout passed: logged (nginx's 499), then cancelled
        audit.update(status=499, request_id=rid, error="cancelled before the answer",
                     duration_ms=round((time.perf_counter() - started) * 1e3, 3))
        ingress.audit(audit)
        raise
    except Exception as exc:
        if isinstance(exc, RuntimeError) and str(exc) == _NOTHING_SENT and await _disconnected(request):
            # the client left while its body was read, so the app answered nothing: nginx's 499
            audit.update(status=499, request_id=rid, error="the client went away before the answer",
                         duration_ms=round((time.perf_counter() - started) * 1e3, 3))
            ingress.audit(audit)
            return Response(status_code=499)
        # a bug: still JSON, still audited
        audit["error"] = f"{type(exc).__name__}: {exc}"[:500]
        response = error_response(500, "internal error; the request is logged", rid, model=_chosen(request))
    chosen = _chosen(request)
    if chosen is not None:  # every response names the version that answered (module doc)
        response.headers["X-Model-Alias"] = _header_value(chosen["alias"])
        response.headers["X-Model-Bundle"] = _header_value(chosen["bundle"])
    audit.update(status=response.status_code, request_id=rid,
                 duration_ms=round((time.perf_counter() - started) * 1e3, 3))
    ingress.audit(audit)
    return response


async def _disconnected(request: Request) -> bool:
    """Whether the client has gone (Starlette's `is_disconnected`; False if it cannot tell)."""
    try:
        return await request.is_disconnected()
    except Exception:  # a receive channel already closed: nothing to tell
        return False


async def audit_upload(request: Request) -> None:
    """Put the uploaded image's sha256 on the request's audit line (`request.state.audit`,
    set by the middleware). A dependency of /v1/analyze: FastAPI runs it once the form is
    parsed, before it validates the fields, so a request it refuses for a malformed field
    (422, the handler never called) still logs the image it carried; the upload is
    closed by the time an exception handler could read it."""
    audit = getattr(request.state, "audit", None)
    if audit is None:
        return
    image = (await request.form()).get("image")
    if not hasattr(image, "read"):  # no upload (absent, or a plain text field)
        return
    digest = hashlib.sha256()
    await image.seek(0)
    while chunk := await image.read(1 << 20):
        digest.update(chunk)
    await image.seek(0)
    audit["image_sha256"] = digest.hexdigest()


def _modality(given: str | None, from_file: str | None) -> str:
    value = given if given not in (None, "") else (from_file or "SEM")
    for m in MODALITIES:
        if value.lower() == m.lower():
            return m
    raise RequestError(422, f"modality: {value[:40]!r} is not one of {', '.join(MODALITIES)}")


def _positive(field: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise RequestError(422, f"{field}: {value} must be a positive finite number of nanometres")
    return float(value)


def _pixel_size(given: float | None, given_y: float | None,
                from_file: tuple[float, float] | None) -> tuple[tuple[float, float], str]:
    """((y, x) nm per pixel, where it came from) of an upload: the request's fields
    (pixel_size_nm, the x size and by default the y size too; pixel_size_y_nm where the
    pixels are not square), else the TIFF's own (y, x) pair, else a 422 naming the field.
    The fields replace the file's pair whole: a y size alone, beside the file's x size,
    would be half of one calibration and half of another, so it is refused."""
    if given_y is not None and given is None:
        raise RequestError(422, "pixel_size_y_nm: given without pixel_size_nm; send pixel_size_nm (x, and y for "
                                "square pixels) with it, or neither to use the TIFF's own pixel size")
    if given is not None:
        px = _positive("pixel_size_nm", given)
        py = px if given_y is None else _positive("pixel_size_y_nm", given_y)
        return (py, px), "request"
    if from_file is not None and all(math.isfinite(v) and v > 0 for v in from_file):
        return (float(from_file[0]), float(from_file[1])), "tiff metadata"
    raise RequestError(422, "pixel_size_nm: required, the image carries no pixel size in its metadata")


def preprocess_refusal(exc: BaseException) -> RequestError | None:
    """The refusal for an error of the preprocess stage that is the input's fault, else
    None (the server's: a 500). `exc` is what awaiting the stage raised: a RayTaskError
    whose `cause` is the stage's own exception (engine.serving.prepare): `TooLarge`
    (more pixels than max_pixels once resampled) is a 413, as over the limit as sent;
    `BadImage` (pixels that cannot be tiled or fitted) a 422."""
    cause = getattr(exc, "cause", exc)
    if isinstance(cause, TooLarge):
        return RequestError(413, f"image: too large once resampled ({str(cause)[:300]})")
    if isinstance(cause, BadImage):
        return RequestError(422, f"image: cannot be preprocessed ({str(cause)[:300]})")
    return None


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    """The FastAPI app's state in one replica: keys, rate buckets, audit log, arms, handles."""

    def __init__(self, config: dict[str, Any], preprocess, detector, segmenter, classifier):
        from engine.audit import AuditLog
        from engine.serving.keys import KeyStore
        from engine.serving.ratelimit import RateLimiter

        self.config = ServeConfig(**config)
        self.keys = KeyStore.load(self.config.keys_file)
        self.rate = RateLimiter()
        self._audit = AuditLog(self.config.audit_log) if self.config.audit_log else AuditLog.default()
        self._registry = self.config.registry()
        self.pre, self.det, self.seg, self.clf = preprocess, detector, segmenter, classifier
        self._labels: dict[str, dict[str, list[str]]] = {}
        self._split = dict(self.config.split)
        self._ttl = self.config.alias_ttl_s
        self._settings_error: str | None = None  # why the last live settings sent were refused
        self._arms = None
        self._resolved_at = 0.0
        self._refreshing = threading.Lock()  # at most one background refresh
        self._resolving = threading.Lock()  # refreshes one at a time: the last one started wins
        self.refresh()
        api.state.ingress = self

    # ------------------------------------------------------------------ versions

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new split or generation (serve.run / serve deploy): read the aliases now.
        Settings the startup checks would refuse (a split without production, a weight
        that is no number: `ServeConfig.with_live_settings`) are refused whole: logged,
        shown as /healthz's settings_error, and this replica goes on with the settings
        in force (were it to take them, every health check would fail and Serve would
        replace the replica with the same settings, over and over)."""
        try:
            config = self.config.with_live_settings(user_config)
        except GrainflowError as exc:
            self._settings_error = f"{exc}; still serving with split {self._split}"
            _log.error("ingress: live settings refused: %s", self._settings_error)
            return
        self.config, self._settings_error = config, None
        self._split = dict(config.split)
        self._ttl = config.alias_ttl_s
        self.refresh()

    def refresh(self):
        """Read the aliases for the current split. Serialised, so a slow background
        refresh begun before a `reconfigure` cannot land after it with the old split."""
        from engine.serving.versions import resolve_arms

        with self._resolving:
            self._arms = resolve_arms(self._registry, self.config.bundle, self._split)
            self._resolved_at = time.monotonic()
            return self._arms

    def _maybe_refresh(self) -> None:
        """Past the TTL: re-read the aliases in the background; requests go on meanwhile."""
        if self._ttl <= 0 or time.monotonic() - self._resolved_at < self._ttl:
            return
        if self._refreshing.acquire(blocking=False):
            def run():
                try:
                    self.refresh()
                except Exception:
                    self._resolved_at = time.monotonic()  # keep the arms we have; try again after the TTL
                finally:
                    self._refreshing.release()

            threading.Thread(target=run, daemon=True).start()

    def check_health(self) -> None:
        if self._arms is None or "production" not in self._arms.refs:
            raise RuntimeError("ingress: no production version resolved")

    # ------------------------------------------------------------------ guard

    def refuse(self, request: Request, audit: dict[str, Any]) -> JSONResponse | None:
        """The refusal for this request (401/403/429/411/413), or None to go on."""
        scope = _scope_of(_route_path(request))
        if scope is None:
            return None
        rid = request.state.request_id
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
        principal = self.keys.verify(key)
        if principal is None:
            claimed = split_key(key or "")
            if claimed is not None:  # a well-formed key: log the id it claims, so guesses at a key show
                audit.update(key_id=claimed[0][:MAX_KEY_ID], key_claimed=True)
            return error_response(401, "missing or invalid API key (send Authorization: Bearer <key> or X-API-Key)",
                                  rid, {"WWW-Authenticate": "Bearer"})
        audit.update(tenant=principal.tenant, key_id=principal.key_id)
        request.state.principal = principal
        if scope not in principal.scopes:
            return error_response(403, f"this key lacks the {scope!r} scope (it has: {', '.join(sorted(principal.scopes))})",
                                  rid)
        ok, retry = self.rate.allow(principal.key_id, principal.rate_per_minute or self.config.rate_per_minute)
        if not ok:
            return error_response(429, f"rate limit of key {principal.key_id} reached; retry in {retry} s", rid,
                                  {"Retry-After": str(retry)})
        if request.method == "POST" and scope == "analyze":  # admin routes take no body
            length = request.headers.get("content-length")
            if length is None:
                return error_response(411, "Content-Length: required", rid)
            try:
                n = int(length)
            except ValueError:
                return error_response(400, f"Content-Length: {length[:20]!r} is not a number", rid)
            if n > self.config.max_body_bytes:
                return error_response(413, f"body of {n} bytes is over the limit of {self.config.max_body_bytes}",
                                      rid)
        return None

    def audit(self, entry: dict[str, Any]) -> None:
        self._audit.append(entry)

    # ------------------------------------------------------------------ routes

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def viewer(self) -> HTMLResponse:
        return HTMLResponse(resources.files("engine.serving").joinpath("viewer.html").read_text())

    @api.get("/healthz", response_model=Health, responses=_OPEN_ERRORS)
    def healthz(self) -> dict[str, Any]:
        """Liveness, and the bundle versions the aliases point at."""
        self._maybe_refresh()
        return {"status": "ok", "arms": dict(self._arms.refs), "settings_error": self._settings_error}

    @api.get("/v1/models", response_model=ModelsResponse, responses=_KEYED_ERRORS)
    async def models(self, request: Request, key: Optional[str] = Security(_key_header),
                     bearer: Optional[HTTPAuthorizationCredentials] = Security(_bearer)) -> dict[str, Any]:
        """The bundle, the traffic split and the member versions each alias serves."""
        self._maybe_refresh()
        arms = self._arms
        members = {}
        for ref in sorted(set(arms.refs.values())):
            # a registry round trip (and a file fetch): off the event loop that serves every request
            bundle = await asyncio.to_thread(self._registry.get_bundle, ref)
            members[ref] = {role: mv.ref for role, mv in bundle.items()}
        labels = await self._labels_of(arms.refs["production"])
        return {"bundle": self.config.bundle, "split": dict(arms.weights), "arms": dict(arms.refs),
                "members": members, **labels}

    @api.post("/v1/admin/refresh", response_model=Health, responses=_KEYED_ERRORS)
    def admin_refresh(self, key: Optional[str] = Security(_key_header),
                      bearer: Optional[HTTPAuthorizationCredentials] = Security(_bearer)) -> dict[str, Any]:
        """Read the registry's aliases again now (this replica); `generation` in the
        config does it for every replica."""
        return {"status": "ok", "arms": dict(self.refresh().refs), "settings_error": self._settings_error}

    @api.post("/v1/analyze", response_model=AnalyzeResponse, response_model_by_alias=True, responses=_ANALYZE_ERRORS,
              dependencies=[Depends(audit_upload)])
    async def analyze(
        self,
        request: Request,
        image: UploadFile = File(..., description="PNG, TIFF (8/16-bit; (y, x) pixel size read from its metadata) "
                                                  "or a raw little-endian array (application/octet-stream)"),
        modality: Optional[str] = Form(None, description="SEM, TEM or optical (default: the TIFF's, else SEM)"),
        pixel_size_nm: Optional[float] = Form(None, description="nm per pixel along x (columns), and along y too "
                                                                "unless pixel_size_y_nm is given; needed unless the "
                                                                "TIFF has its pixel size (the fields replace it)"),
        pixel_size_y_nm: Optional[float] = Form(None, description="nm per pixel along y (rows), for non-square "
                                                                  "pixels (fast-scan SEM, line-scan camera); only "
                                                                  "with pixel_size_nm; default: pixel_size_nm"),
        dtype: Optional[str] = Form(None, description="raw arrays: uint8, uint16, uint32, int8, int16, int32, float32"),
        shape: Optional[str] = Form(None, description="raw arrays: height,width"),
        preview: bool = Form(False, description="also answer an 8-bit PNG of the image for display "
                                                "(`preview_png`, engine.serving.preview)"),
        key: Optional[str] = Security(_key_header),
        bearer: Optional[HTTPAuthorizationCredentials] = Security(_bearer),
    ) -> JSONResponse:
        """Detections (boxes in px and nm, class, score, RLE masks, measurements), material,
        grade, the versions that answered and timings, for one micrograph."""
        t0 = time.perf_counter()
        rid, audit = request.state.request_id, request.state.audit
        self._maybe_refresh()
        await image.seek(0)  # audit_upload read it to hash it
        data = await image.read()
        audit["image_sha256"] = hashlib.sha256(data).hexdigest()
        try:
            decoded = await asyncio.to_thread(decode, data, image.content_type, dtype=dtype, shape=parse_shape(shape),
                                              max_pixels=self.config.max_pixels)
        except UnsupportedMedia as exc:
            raise RequestError(415, str(exc)) from None
        except TooLarge as exc:
            raise RequestError(413, str(exc)) from None
        except BadImage as exc:
            raise RequestError(422, str(exc)) from None
        mod = _modality(modality, decoded.modality)
        size, source = _pixel_size(pixel_size_nm, pixel_size_y_nm, decoded.pixel_size_yx_nm)
        t_decode = time.perf_counter()
        alias, ref = self._arms.choose(rid)
        audit.update(alias=alias, models={"bundle": ref})
        request.state.model = {"alias": alias, "bundle": ref}  # named by every response from here on
        answer = await self._stages(ref, decoded.pixels, mod, size)
        t_stages = time.perf_counter()
        from engine.serving.response import image_info, respond

        info = image_info(decoded.pixels, format=decoded.format, sha256=audit["image_sha256"], modality=mod,
                          pixel_size_yx_nm=size, pixel_size_source=source, level=answer.level,
                          level_pixel_size_yx_nm=(answer.level_pixel_size_y_nm, answer.level_pixel_size_nm))

        # decode and the stages' wall time seen here; each stage's compute time in its
        # replica; stages_ms minus (preprocess + max(classify, detect + segment) + measure)
        # is what the hops between replicas cost
        timings = {"decode_ms": (t_decode - t0) * 1e3, "stages_ms": (t_stages - t_decode) * 1e3,
                   **{f"{stage}_ms": ms for stage, ms in answer.timings_ms.items()}}
        body = respond(answer.analysis, image=info, alias=alias, request_id=rid, timings_ms=timings,
                       batch_sizes=answer.batch_sizes)
        if preview:
            from engine.serving.preview import display_png

            body["preview_png"] = await asyncio.to_thread(display_png, decoded.pixels)
        body["timings_ms"]["total_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        audit["models"] = body["model"]["versions"]
        return JSONResponse(body)

    async def _stages(self, ref: str, pixels, modality: str, pixel_size_nm: tuple[float, float]):
        """The four stages: preprocess, then the classifier beside the detector and
        segmenter; each call's DeploymentResponse is the next call's argument, so the pass
        goes replica to replica; only the StagesAnswer comes back (order and why:
        engine.serving.deployments). pixel_size_nm: (y, x) nm."""
        sent = {}

        async def chain():
            sent["pre"] = pre = self.pre.remote(ref, pixels, modality, pixel_size_nm)
            detected = self.det.detect.remote(ref, pre)
            # The classification goes to the segmenter as an ObjectRef inside a list, which
            # Serve passes on unresolved: the segmenter segments first and waits for it
            # after, so classify overlaps detect + segment. (A DeploymentResponse argument
            # would hold the segmenter's call until the classifier had answered.)
            classified = await self.clf.classify.remote(ref, pre)._to_object_ref()
            return await self.seg.segment.remote(ref, detected, [classified])

        try:
            return await self._retrying(chain)
        except RayTaskError:
            try:
                await sent["pre"]
            except RayTaskError as exc:
                refusal = preprocess_refusal(exc)
                if refusal is not None:
                    raise refusal from None
                # anything else (a bundle that fails to load, memory) is the server's: a 500, audited
            raise

    async def _retrying(self, send):
        """Await `send()` (a stage call or chain), sent again when a replica serving it
        died (Serve routes the retry to a live one)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(_MAX_ATTEMPTS):
            try:
                return await send()
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                if attempt == _MAX_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _labels_of(self, ref: str) -> dict[str, list[str]]:
        if ref not in self._labels:
            self._labels[ref] = await self._retrying(lambda: self.clf.labels.remote(ref))
        return self._labels[ref]
