"""The image stage against Replicate: one paid prediction per token, resumed after a rescue.

    glisk worker image --handler glisk.handlers.image:generate

Settings: REPLICATE_API_TOKEN (required), REPLICATE_BASE_URL, REPLICATE_MODEL, REPLICATE_VERSION,
REPLICATE_INPUT, REPLICATE_SEED_INPUT, REPLICATE_POLL_INTERVAL, REPLICATE_PREDICTION_TIMEOUT,
REPLICATE_HTTP_TIMEOUT, GLISK_IMAGE_DIR.

For each token, in order:

1. The author's prompt is checked (not empty, at most 500 characters, no control character other
   than tab and newline) before anything is sent: a bad prompt fails the token at once
   (``PromptRefused``, a PermanentError).
2. The intent is checkpointed before the prediction is created: a job id, the exact input (the
   prompt, REPLICATE_INPUT, and a seed derived from the token: ``seed_for``) and the time. The
   job is recorded in ``image_generation_jobs`` (pending).
3. The prediction is created (asynchronously: its id comes back at once) and its id checkpointed
   before any waiting; the job becomes running with that id. Right before the create request's
   first byte is written the handler checks, by its own clock, that its lease still has half
   its length left (``ensure_live`` under ``send_guard``): a holder paused after its checkpoint,
   even in the middle of the call, never creates once a rescuer may; and
   a rescuer that finds another holder's intent without a prediction waits half a lease before
   it looks, so a create that holder sent just before its lease ran out has landed. (Replicate
   takes no idempotency key: a pause in the microseconds between that check and the request's
   last byte leaving is the one window left.)
4. The handler polls every REPLICATE_POLL_INTERVAL until the prediction succeeds, fails or is
   canceled; one still running REPLICATE_PREDICTION_TIMEOUT after its creation is canceled (the
   attempt fails and the next one creates a new prediction).
5. The output is downloaded and stored under GLISK_IMAGE_DIR as ``<sha256>.<ext>``: the same
   bytes always land on the same path, so a repeated fetch changes nothing. The path is the
   stage's result; the job is completed.

A rescuer (or the next attempt) reads the checkpoint instead of starting over: with a prediction
id it resumes that prediction; with only the intent (the previous holder died, or its create's
reply was lost, between creating and checkpointing) it looks the prediction up among the
account's recent ones by its exact input (the seed makes it unique to the token) and adopts it;
only when none exists is one created. A create whose reply is lost is looked up at once the
same way. So a token is paid for once, whoever holds it and however often.

Outcomes: HTTP 429 -> RetryLater(Retry-After); a prompt the model refuses (HTTP 422, or a
prediction failed for NSFW or safety reasons) -> PermanentError naming the reason; anything else
(5xx, a failed or canceled prediction, a timeout) fails the attempt, retried with backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from glisk.errors import (
    PermanentError,
    ServiceError,
    ServiceRefused,
    ServiceUnavailable,
)
from glisk.handlers.records import JobStatus
from glisk.handlers.stage import Parts, ServiceStage
from glisk.services.http import send_guard
from glisk.workers.checkpoints import checkpoint, ensure_live, lease_seconds
from glisk.workers.claims import Claim

if TYPE_CHECKING:
    from glisk.core.config import Settings
    from glisk.services.replicate import Prediction, ReplicateService

log = structlog.get_logger("glisk.handlers.image")

# A prediction is looked for among those created from this long before its intent was recorded
# (clocks of workers and the service differ a little).
CLOCK_SKEW = timedelta(minutes=2)
# Words in a failed prediction's error that mean the model refused the prompt itself.
REFUSAL_WORDS = ("nsfw", "safety", "content policy", "inappropriate")
EXTENSIONS = {"image/png": "png", "image/webp": "webp", "image/jpeg": "jpg", "image/gif": "gif"}
ALLOWED_CONTROLS = frozenset("\t\n")
# The authors table's rule (glisk.models.author.PROMPT_MAX), not imported: the ORM stays unloaded
# in worker processes. tests/handlers checks that the two agree.
PROMPT_MAX = 500


class PromptRefused(PermanentError):
    """The prompt breaks a rule, or the model refused it: generating again cannot help."""


def validate_prompt(prompt: Any) -> str:
    """The prompt to send, stripped; PromptRefused naming the rule it breaks (never quoting it)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptRefused("the prompt is empty")
    text = prompt.strip()
    if len(text) > PROMPT_MAX:
        raise PromptRefused(f"the prompt has {len(text)} characters, more than {PROMPT_MAX}")
    for char in text:
        if unicodedata.category(char) == "Cc" and char not in ALLOWED_CONTROLS:
            raise PromptRefused(f"the prompt holds the control character U+{ord(char):04X}")
    return text


def seed_for(token_uuid: uuid.UUID) -> int:
    """The token's seed: the same for every attempt, different for every token (31 bits)."""
    digest = hashlib.sha256(b"glisk-seed:" + token_uuid.bytes).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def store_image(directory: Path, data: bytes, content_type: str) -> Path:
    """Write ``data`` to ``directory/<sha256>.<ext>`` atomically unless it is there already;
    the path. The same bytes always give the same path."""
    extension = EXTENSIONS.get(content_type, "bin")
    path = directory / f"{hashlib.sha256(data).hexdigest()}.{extension}"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    temporary.write_bytes(data)
    temporary.replace(path)
    return path


class ImageStage(ServiceStage["ReplicateService"]):
    """The image stage's handler; ``generate`` below is the one ``glisk worker`` runs."""

    secret_setting = "replicate_api_token"  # noqa: S105 - the setting's name, not its value

    def _service(self, settings: Settings) -> ReplicateService:
        from glisk.services.replicate import ReplicateService

        return ReplicateService(
            api_token=settings.require_secret(self.secret_setting),
            model=settings.replicate_model,
            version=settings.replicate_version,
            base_url=settings.replicate_base_url,
            timeout=settings.replicate_http_timeout,
        )

    async def _run(self, claim: Claim, parts: Parts[ReplicateService]) -> str:
        return await _Generation(claim, parts).run()


class _Generation:
    """One handler call for one claim."""

    def __init__(self, claim: Claim, parts: Parts[ReplicateService]) -> None:
        self.claim = claim
        self.settings = parts.settings
        self.service = parts.service
        self.records = parts.records
        # The checkpoint as the previous holder (or attempt) left it, then as this call writes it.
        self.state: dict[str, Any] = dict((claim.checkpoint or {}).get("replicate") or {})

    async def run(self) -> str:
        prediction = await self._resume()
        if prediction is None:
            prediction = await self._create()
        prediction = await self._wait(prediction)
        return await self._finish(prediction)

    # -- recording ------------------------------------------------------------------------------

    async def _save(self) -> None:
        """Checkpoint the state (fenced: LeaseLost when this worker no longer holds the token)."""
        await checkpoint(self.claim, {"replicate": self.state})

    async def _record(
        self,
        status: JobStatus,
        prediction_id: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        await self.records.image_job(
            uuid.UUID(self.state["job"]),
            self.claim.token_uuid,
            status,
            prediction_id=prediction_id,
            error=error,
        )

    async def _intend(self) -> None:
        """Record the intent to create a prediction: a new job, the input, the time."""
        previous_input = self.state.get("input")
        if previous_input is None:
            author = await self.records.author(self.claim.author_id)
            previous_input = {
                **self.settings.replicate_input,
                "prompt": validate_prompt(author.prompt),
            }
            if self.settings.replicate_seed_input:
                previous_input[self.settings.replicate_seed_input] = seed_for(self.claim.token_uuid)
        self.state = {
            "job": str(uuid.uuid4()),
            "input": previous_input,
            "since": datetime.now(UTC).isoformat(),
            "claim": str(self.claim.claim_id),  # whose intent: a rescuer waits before it looks
        }
        await self._save()
        await self._record("pending")

    # -- the prediction -------------------------------------------------------------------------

    async def _resume(self) -> Prediction | None:
        """The prediction an earlier holder or attempt started and that may still serve, or None
        (then one is to be created)."""
        if not self.state or self.state.get("expired"):
            return None
        prediction: Prediction | None = None
        if self.state.get("prediction"):
            try:
                prediction = await self.service.get(self.state["prediction"])
            except ServiceRefused:  # 404: gone (expired); a new one is needed
                prediction = None
        else:
            if self.state.get("claim") != str(self.claim.claim_id):
                # Another holder's intent: a create it sent with its lease still live may be on
                # its way; give it half a lease to land before looking (see ensure_live).
                await asyncio.sleep(lease_seconds() / 2)
            prediction = await self._lookup()
            if prediction is not None:
                await self._adopt(prediction)
        if prediction is None:
            return None
        log.info(
            "image.resume",
            token_id=self.claim.token_id,
            prediction=prediction.id,
            status=prediction.status,
        )
        if prediction.status == "failed" and not _refused(prediction):
            await self._record("failed", prediction.id, _error_of(prediction))
            return None  # an ordinary failure: this attempt makes a new prediction
        if prediction.status == "canceled":
            await self._record("failed", prediction.id, {"status": "canceled"})
            return None
        return prediction

    async def _lookup(self) -> Prediction | None:
        """The prediction created with the recorded input since the recorded intent, if any
        (only when a seed makes the input unique to this token)."""
        if not self.settings.replicate_seed_input or "input" not in self.state:
            return None
        since = datetime.fromisoformat(self.state["since"]) - CLOCK_SKEW
        return await self.service.find(self.state["input"], since)

    async def _adopt(self, prediction: Prediction) -> None:
        created = prediction.created_at.timestamp() if prediction.created_at else time.time()
        self.state = {**self.state, "prediction": prediction.id, "created": created}
        await self._save()
        await self._record("running", prediction.id)

    async def _create(self) -> Prediction:
        if not self.state or self.state.get("prediction"):
            await self._intend()
        else:
            # An earlier holder's intent whose prediction was never made: the same job and
            # input, now ours; checkpointed again, so that only a live holder creates.
            self.state = {**self.state, "claim": str(self.claim.claim_id)}
            await self._save()
        # A holder paused between that checkpoint and the request (SIGSTOP, a frozen VM) may have
        # lost its lease meanwhile; its rescuer, finding no prediction yet, creates one: never a
        # second one from here. The lease is checked on the wire, right before the request's
        # first byte is written, not before the call: a pause during the connection's set-up
        # is caught too (LeaseLost gives the token back, no attempt spent).
        try:
            with send_guard(lambda: ensure_live(self.claim)):
                prediction = await self.service.create(self.state["input"])
        except ServiceUnavailable:
            # The reply is lost: the prediction may exist. Adopt it if so; else this attempt
            # fails, and the next one looks again before creating.
            found = await self._lookup()
            if found is None:
                raise
            log.info("image.adopted_lost_create", token_id=self.claim.token_id, prediction=found.id)
            prediction = found
        except ServiceRefused as exc:
            await self._record("failed", None, {"refused": str(exc)})
            raise PromptRefused(f"the model refused the input: {exc}") from exc
        await self._adopt(prediction)
        return prediction

    async def _wait(self, prediction: Prediction) -> Prediction:
        deadline = float(self.state.get("created") or time.time()) + (
            self.settings.replicate_prediction_timeout
        )
        while not prediction.done:
            if time.time() >= deadline:
                await self.service.cancel(prediction.id)
                await self._record("failed", prediction.id, {"status": "timed out"})
                raise ServiceError(
                    "replicate",
                    f"prediction {prediction.id} still {prediction.status} after "
                    f"{self.settings.replicate_prediction_timeout:g} s: canceled",
                )
            await asyncio.sleep(self.settings.replicate_poll_interval)
            prediction = await self.service.get(prediction.id)
        return prediction

    async def _finish(self, prediction: Prediction) -> str:
        if prediction.status == "succeeded":
            urls = prediction.output_urls()
            if not urls:
                await self._record("failed", prediction.id, {"output": "none"})
                raise ServiceError("replicate", f"prediction {prediction.id} has no output URL")
            try:
                data, content_type = await self.service.download(urls[0])
            except ServiceRefused as exc:
                # The output expired (or is unusable): the next attempt makes a new prediction.
                self.state = {**self.state, "expired": True}
                await self._save()
                await self._record("failed", prediction.id, {"output": str(exc)})
                raise ServiceError("replicate", f"prediction {prediction.id}: {exc}") from exc
            path = await asyncio.to_thread(store_image, self.settings.image_dir, data, content_type)
            await self._record("completed", prediction.id)
            return str(path)
        await self._record("failed", prediction.id, _error_of(prediction))
        if _refused(prediction):
            raise PromptRefused(f"the model refused the prompt: {_reason(prediction)}")
        raise ServiceError(
            "replicate", f"prediction {prediction.id} {prediction.status}: {_reason(prediction)}"
        )


def _reason(prediction: Prediction) -> str:
    lines = (prediction.error or prediction.status).strip().splitlines()
    return lines[0][:300] if lines else prediction.status


def _refused(prediction: Prediction) -> bool:
    error = (prediction.error or "").lower()
    return prediction.status == "failed" and any(word in error for word in REFUSAL_WORDS)


def _error_of(prediction: Prediction) -> dict[str, Any]:
    return {"status": prediction.status, "error": _reason(prediction)}


generate = ImageStage()
