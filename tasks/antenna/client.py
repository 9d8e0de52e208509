"""HTTP client of Antenna's pull-mode API (v2): register pipelines, find jobs, take tasks,
post answers.

Failures come in three kinds, because the bridge treats them differently: a refused token
(AntennaAuthError, a UserError: nothing will work until a person fixes it), Antenna or its
queue unavailable (AntennaUnavailable: back off, take no more tasks, keep what is computed),
and, for result posts only, a request that may or may not have landed (reported per result,
so that an answer is never posted twice). The token is only ever in the Authorization header:
errors name the URL path and the status, never a header.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx
from pydantic import ValidationError

from tasks.antenna.schemas import (
    POSITIONS,
    ClientInfo,
    JobList,
    JobListItem,
    PipelineConfig,
    PipelineRegistrationRequest,
    PipelineRegistrationResponse,
    PipelineResultsError,
    ProcessingTask,
    TaskResult,
    TasksRequest,
    TasksResponse,
)
from tasks.errors import UserError

ASYNC_API = "async_api"  # Antenna's dispatch mode of pull-mode jobs


class AntennaAuthError(UserError):
    """Antenna refused the token (401/403)."""


class AntennaUnavailable(Exception):
    """Antenna or its task queue did not answer usefully; try again later."""


@dataclass(frozen=True)
class MalformedTask:
    """A task that cannot become a capture; answered with a PipelineResultsError."""

    task_id: str
    reply_subject: str
    image_id: str | None
    error: str


@dataclass
class PostReport:
    """What happened to each answer of one post_results call, by reply subject."""

    posted: list[str] = field(default_factory=list)
    not_sent: list[str] = field(default_factory=list)  # certainly not received: post again
    unknown: list[str] = field(default_factory=list)  # may have landed: never post again
    too_large: list[str] = field(default_factory=list)  # answered with an error instead
    error: str = ""
    refused_token: bool = False  # 401/403: the bridge must stop


def client_info() -> ClientInfo:
    try:
        software_version = version("trapq")
    except PackageNotFoundError:
        software_version = "unknown"
    return ClientInfo.model_validate(
        {"hostname": socket.gethostname(), "pid": os.getpid(), "software": "trapq",
         "version": software_version}
    )


class AntennaClient:
    def __init__(self, base_url: str, token: str, *, timeout_s: float = 60.0,
                 max_post_bytes: int = 8 * 2**20) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UserError(
                f"TRAPQ_ANTENNA_URL {base_url!r} is not an http(s) URL "
                "(e.g. https://antenna.example.org/api/v2)"
            )
        self.base_url = base_url.rstrip("/")
        self.max_post_bytes = max_post_bytes
        self.info = client_info()
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Token {token}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._http.close()

    def register(self, project_id: int, service_name: str,
                 pipelines: Sequence[PipelineConfig]) -> PipelineRegistrationResponse:
        body = PipelineRegistrationRequest(
            processing_service_name=service_name, pipelines=list(pipelines)
        )
        resp = self._send("POST", f"/projects/{project_id}/pipelines/",
                          json=body.model_dump(mode="json", exclude_none=True))
        return self._parse(PipelineRegistrationResponse, resp)

    def jobs(self, project_id: int, slugs: Sequence[str]) -> list[JobListItem]:
        """The project's unfinished pull-mode jobs on these pipelines, every page."""
        params: dict[str, Any] | None = {
            "project_id": project_id,
            "pipeline__slug__in": ",".join(slugs),
            "ids_only": 1,
            "incomplete_only": 1,
            "dispatch_mode": ASYNC_API,
        }
        url = "/jobs/"
        found: list[JobListItem] = []
        while True:
            page = self._parse(JobList, self._send("GET", url, params=params))
            found += page.results
            if not page.next:
                return found
            url, params = page.next, None

    def take_tasks(self, job_id: int,
                   batch_size: int) -> tuple[list[ProcessingTask], list[MalformedTask]]:
        """Reserve up to batch_size tasks; an empty list means nothing to do now."""
        body = TasksRequest(batch_size=batch_size, client_info=self.info)
        resp = self._send("POST", f"/jobs/{job_id}/tasks/", json=body.model_dump(mode="json"))
        return split_tasks(self._parse(TasksResponse, resp).tasks)

    def post_results(self, job_id: int, results: Sequence[TaskResult],
                     positions: dict[str, dict[str, int]]) -> PostReport:
        """POST the answers in bodies of at most max_post_bytes; a 413 splits a body in two.
        Their scores go out at their labels' `positions` (schemas.ClassificationResponse).

        An answer too large to go alone is replaced by a PipelineResultsError saying so,
        so the task is still answered. After Antenna stops answering, the answers left are
        reported not sent, and the bridge keeps them for later.
        """
        report = PostReport()
        encoded = [(r.reply_subject, _encode(r, positions)) for r in results]
        pending = list(self._packs(encoded))
        while pending:
            pack = pending.pop(0)
            outcome = self._post_pack(job_id, pack)
            if outcome == "posted":
                report.posted += [subject for subject, _ in pack]
            elif outcome == "too_large" and len(pack) > 1:
                half = len(pack) // 2
                pending[:0] = [pack[:half], pack[half:]]
            elif outcome == "too_large" and pack[0][0] not in report.too_large:
                subject, _ = pack[0]
                report.too_large.append(subject)
                pending.insert(0, [(subject, _encode(_too_large_answer(results, subject),
                                                     positions))])
            elif outcome == "too_large":
                report.not_sent.append(pack[0][0])
                report.error = "not sent: even a one-line error answer was refused with 413"
            else:
                report.error = outcome.partition(": ")[2]
                report.refused_token = outcome.startswith("auth")
                kind = report.unknown if outcome.startswith("unknown") else report.not_sent
                kind += [subject for subject, _ in pack]
                report.not_sent += [s for p in pending for s, _ in p]
                return report
        return report

    def _packs(self, encoded: list[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
        budget = self.max_post_bytes - len(self._body([]))
        pack: list[tuple[str, bytes]] = []
        size = 0
        for item in encoded:
            grown = size + len(item[1]) + (1 if pack else 0)
            if pack and grown > budget:
                yield pack
                pack, grown = [], len(item[1])
            pack.append(item)
            size = grown
        if pack:
            yield pack

    def _body(self, parts: list[bytes]) -> bytes:
        info = self.info.model_dump_json().encode()
        return b'{"results":[' + b",".join(parts) + b'],"client_info":' + info + b"}"

    def _post_pack(self, job_id: int, pack: list[tuple[str, bytes]]) -> str:
        """posted, too_large, or a reason prefixed `unknown: `, `not sent: ` or `auth: `."""
        body = self._body([part for _, part in pack])
        path = f"/jobs/{job_id}/result/"
        try:
            resp = self._http.post(path, content=body,
                                   headers={"Content-Type": "application/json"})
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            return f"not sent: cannot reach Antenna at {self.base_url} ({type(e).__name__})"
        except httpx.TransportError as e:
            return f"unknown: POST {path} broke off ({type(e).__name__})"
        if resp.status_code == 413:
            return "too_large"
        try:
            _raise_for_auth(resp, path)
        except AntennaAuthError as e:
            return f"auth: {e}"
        if resp.status_code >= 400:
            return f"not sent: POST {path} answered HTTP {resp.status_code}"
        return "posted"

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        path = httpx.URL(url).path
        try:
            resp = self._http.request(method, url, **kwargs)
        except httpx.TransportError as e:
            raise AntennaUnavailable(
                f"{method} {path}: cannot reach Antenna at {self.base_url} ({type(e).__name__})"
            ) from None
        _raise_for_auth(resp, path)
        if resp.status_code >= 500 or resp.status_code == 429:
            raise AntennaUnavailable(f"{method} {path} answered HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise UserError(
                f"Antenna refused {method} {path} with HTTP {resp.status_code}: "
                f"{resp.text[:200]} (check TRAPQ_ANTENNA_PROJECTS and the pipelines registered)"
            )
        return resp

    @staticmethod
    def _parse(model: Any, resp: httpx.Response) -> Any:
        try:
            return model.model_validate_json(resp.content)
        except ValidationError as e:
            where = f"{resp.request.method} {resp.request.url.path}"
            raise AntennaUnavailable(
                f"{where}: unexpected answer ({e.errors()[0]['msg']})"
            ) from None


def split_tasks(raw: list[dict[str, Any]]) -> tuple[list[ProcessingTask], list[MalformedTask]]:
    """Good tasks, and those to answer with an error: without an image URL, or with a URL
    that is not http(s) (a task must never make a worker read a local file). A task without
    a reply subject cannot be answered at all and is left to Antenna."""
    good: list[ProcessingTask] = []
    bad: list[MalformedTask] = []
    for item in raw:
        subject = item.get("reply_subject")
        if not isinstance(subject, str) or not subject:
            continue
        image_id = item.get("image_id")
        image = str(image_id) if image_id is not None else None
        try:
            task = ProcessingTask.model_validate(item)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            bad.append(MalformedTask(
                str(item.get("id") or subject), subject, image,
                f"malformed task: {where}: {first['msg']}",
            ))
            continue
        if not task.image_url.startswith(("http://", "https://")):
            scheme = task.image_url.split(":", 1)[0] if ":" in task.image_url else "no scheme"
            bad.append(MalformedTask(
                task.id, subject, image, f"image_url must be http(s), got {scheme!r}"
            ))
            continue
        good.append(task)
    return good, bad


def _encode(result: TaskResult, positions: dict[str, dict[str, int]]) -> bytes:
    return result.model_dump_json(exclude_none=True, context={POSITIONS: positions}).encode()


def _too_large_answer(results: Sequence[TaskResult], subject: str) -> TaskResult:
    original = next(r for r in results if r.reply_subject == subject)
    image_id = None
    if not isinstance(original.result, PipelineResultsError) and original.result.source_images:
        image_id = original.result.source_images[0].id
    return TaskResult(reply_subject=subject, result=PipelineResultsError(
        error="result larger than the largest POST Antenna accepts", image_id=image_id
    ))


def _raise_for_auth(resp: httpx.Response, path: str) -> None:
    if resp.status_code in (401, 403):
        raise AntennaAuthError(
            f"Antenna refused the token (HTTP {resp.status_code} on {path}): check "
            "TRAPQ_ANTENNA_TOKEN / TRAPQ_ANTENNA_TOKEN_FILE and that its user may run the "
            "project's jobs"
        )
