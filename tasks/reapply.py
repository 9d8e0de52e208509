"""`trapq reapply JOB`: a finished job's answers under the taxa list and species threshold in
force now (its deployment's list, its project's threshold), from the softmax each
classification stored, on the CPU. Exact where every classification stored it; otherwise
nothing changes and the one line says which re-classification run gives new answers."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db.models import Job
from db.pipelines import job_pipeline
from db.reapply import (
    NewAnswer,
    missing_probabilities,
    set_job_pipeline,
    stored_answers,
    write_answers,
)
from db.states import JOB_ENDED
from db.taxa import taxa_in_force
from inference.pipeline_spec import PipelineSpec
from inference.taxonomy import AnswerPolicy
from tasks.errors import UserError
from tasks.pipeline import with_taxa


@dataclass(frozen=True)
class Reapplied:
    job_id: int
    classifications: int
    changed: int  # answers whose label or rank changed
    fingerprint: str
    unchanged_policy: bool  # the list and threshold in force are the job's already
    tracked: bool  # its occurrences were voted from the answers this replaced


def reapply(factory: sessionmaker[Session], job_id: int) -> Reapplied:
    from inference.reapply import Reapplier

    with factory.begin() as session:
        stored = job_pipeline(session, job_id)
        job = session.get_one(Job, job_id)
        if job.state not in JOB_ENDED:
            raise UserError(f"job {job_id} is {job.state}; re-apply a list once it has ended")
        spec = PipelineSpec.from_dict(stored.spec)
        taxa = taxa_in_force(session, job.deployment_id)
        new = with_taxa(spec.with_answers(_without_list(spec.answers)), taxa.entries,
                        taxa.threshold)
        if new.fingerprint() == spec.fingerprint():
            return Reapplied(job_id, 0, 0, spec.fingerprint(), True, False)
        labels = spec.classifier.labels
        name = spec.classifier.name
        missing = missing_probabilities(session, job_id, name, 2 * len(labels))
        if missing:
            raise UserError(
                f"{missing} classifications of job {job_id} stored no softmax (a head of over "
                "4,096 labels, or TRAPQ_STORE_PROBABILITIES off), so its answers cannot be "
                f"re-applied exactly: run `trapq enqueue {job.deployment.name} "
                f"--reuse-detections-from {job_id}` (the classifier again, not the detector)"
            )
        apply = Reapplier(new.answers or AnswerPolicy(), labels, spec.top_k)
        n = changed = 0
        for batch in stored_answers(session, job_id, name):
            answers = apply([a.probabilities for a in batch])
            write_answers(session, [
                NewAnswer(a.id, r.label, r.score, r.rank, r.source,
                          [[label, score] for label, score in r.topk])
                for a, r in zip(batch, answers, strict=True)
            ])
            n += len(batch)
            changed += sum((a.label, a.rank) != (r.label, r.rank)
                           for a, r in zip(batch, answers, strict=True))
        set_job_pipeline(session, job_id, new.to_dict(), new.fingerprint())
        tracked = job.tracked_at is not None
    return Reapplied(job_id, n, changed, new.fingerprint(), False, tracked)


def _without_list(answers: AnswerPolicy | None) -> AnswerPolicy | None:
    """The job's taxonomy and threshold, its old list dropped: the one in force replaces it."""
    if answers is None or answers.taxonomy is None:
        return None
    return AnswerPolicy(answers.taxonomy, None, answers.threshold)
