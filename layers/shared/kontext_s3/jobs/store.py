"""The jobs table: one item per job, the only thing that stops a second paid request.

**Every change of state is one conditional write that says whether this caller won** (see :mod:`.transitions` for
the table of them, and :mod:`.moves` for the write); only the winner does what follows (copies files, notifies). A
caller *holds* a job (``holder`` token, ``held_until_ms``) while it works on it: the submit function from creating
the job to fal's answer, a finisher (webhook, recovery, cancellation) from its claim to the job's end. A hold that
lapsed means its holder died; another caller may then take it over. SENDING is the point of no return: the request
may be at fal from then on, so a lapsed hold on a SENDING job makes it UNCERTAIN, never SUBMITTING again. Only fal's
definite answer that it does not hold the request leads back.
"""

from __future__ import annotations

from kontext_s3.jobs.creation import JobCreation
from kontext_s3.jobs.finishing import JobFinishing
from kontext_s3.jobs.reads import JobReads


class JobStore(JobReads, JobCreation, JobFinishing):
    """Reads, the transitions, and the finishers' holds, over one table (see each part)."""
