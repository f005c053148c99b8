"""Every change of a job's state, stated once, as data: from where, to where, under which hold, requiring what.

:meth:`JobStore.move <kontext_s3.jobs.store.JobStore.move>` performs any of them as one conditional write on the
job's item and reports whether the caller won (the job as written) or lost (``None``): the condition it writes is
built from the transition's cases below, never spelt out by a caller. The state diagram in ``docs/design.md`` is
:func:`diagram`'s output; a test holds the two together.

A caller *holds* a job (``holder`` token, ``held_until_ms``) while it works on it. The hold rules name what a
transition asks of the hold: none, the caller's own, the caller's own and still live (SENDING is the point of no
return: a lapsed hold may have had its slot handed on), no live hold at all, or a hold whose holder died.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

from kontext_s3.jobs.model import JobState

S = JobState


class Hold(Enum):
    """What a transition asks of the job's hold, as a DynamoDB condition (``:holder`` is the caller's, ``:at`` now)."""

    ANY = ""
    MINE = "holder = :holder"
    MINE_LIVE = "holder = :holder AND held_until_ms > :at"
    FREE = "(attribute_not_exists(holder) OR held_until_ms < :at)"
    LAPSED = "held_until_ms < :at"

    @property
    def words(self) -> str:
        return _HOLD_WORDS[self]


_HOLD_WORDS = {
    Hold.ANY: "whoever holds it",
    Hold.MINE: "the caller's hold",
    Hold.MINE_LIVE: "the caller's live hold",
    Hold.FREE: "no live hold",
    Hold.LAPSED: "its holder died",
}


class Requires(Enum):
    """What else a case asks of the item."""

    NOTHING = ""
    RETRYABLE = "failure_retryable = :true"
    FROM_LINE = "from_line = :true"
    NO_REQUEST = "attribute_not_exists(request_id)"
    #: ``:rid`` (the request id the write records) was never this job's before: a late webhook of a request put back
    #: in line is not adopted (its job may be at fal again under another request).
    NEW_REQUEST = "attribute_not_exists(request_id) AND NOT contains(past_request_ids, :rid)"
    #: Never sent, or fal said it never held it: nothing of it can be at fal, nothing was paid.
    NEVER_SENT = "attribute_not_exists(request_id) AND attribute_not_exists(sent_at_ms)"


class Index(Enum):
    """Where the job stands in the ``open-jobs`` index afterwards."""

    #: Among its state's open jobs, ordered by when it was last looked at (now).
    OPEN = "open"
    #: In line (WAITING), ordered by when its upload arrived.
    LINE = "line"
    #: Ended: out of the index, or under NOTIFY until its event is published.
    ENDED = "ended"


@dataclass(frozen=True)
class Case:
    source: JobState
    hold: Hold = Hold.MINE
    requires: Requires = Requires.NOTHING


@dataclass(frozen=True)
class Transition:
    name: str
    cases: tuple[Case, ...]
    target: JobState
    index: Index = Index.OPEN
    #: The caller holds the job afterwards (``holder``, ``held_until_ms`` from now); else any hold is let go ...
    takes_hold: bool = False
    #: ... unless the hold it had is kept as it was.
    keeps_hold: bool = False
    #: Attributes set to fixed values (the caller adds the values of the moment).
    fixed: tuple[tuple[str, object], ...] = ()
    #: Attributes removed.
    clears: tuple[str, ...] = ()
    #: Counts another attempt at the job.
    counts_attempt: bool = False

    def condition(self) -> str:
        """The conditional write's condition: any one of the cases."""
        parts = []
        for case in self.cases:
            terms = [f"#state = :s_{case.source.value}", case.hold.value, case.requires.value]
            parts.append(" AND ".join(term for term in terms if term))
        # DynamoDB refuses redundant parentheses: a single case goes bare.
        return parts[0] if len(parts) == 1 else " OR ".join(f"({part})" for part in parts)


_REQUEST = ("request_id", "gateway_request_id", "status_url", "response_url", "cancel_url", "submitted_at_ms", "queue_position")
_GRANTS = ("slot", "budget_day", "budget_images")
_WAIT = ("wait_reason", "wait_until_ms")
_FAILURE = ("failure_retryable", "error_code", "error_message", "error_key", "ended_at_ms")
_OPEN = (S.WAITING, S.SUBMITTING, S.SENDING, S.SUBMITTED, S.UNCERTAIN)
#: In line for a slot: the reason a job waits when nothing else is said.
_FOR_A_SLOT = (("wait_reason", "slot"), ("wait_until_ms", 0))


@dataclass(frozen=True)
class Transitions:
    """The table. Each entry's name says what happened; ``move`` takes the entry itself."""

    #: Nothing was sent for it (released, failed retryably, or its holder died before sending; or, on an unversioned
    #: bucket, ended before it reached fal and its bytes written again, see ``holding``): take it up again.
    TAKE_OVER: Transition = Transition(
        "take over",
        (Case(S.SUBMITTING, Hold.FREE), Case(S.FAILED, Hold.ANY, Requires.RETRYABLE), Case(S.FAILED, Hold.ANY, Requires.NEVER_SENT)),
        S.SUBMITTING,
        takes_hold=True,
        clears=_FAILURE,
        counts_attempt=True,
    )
    #: A transient fault before sending: given back for the message's next delivery.
    RELEASE: Transition = Transition("release", (Case(S.SUBMITTING),), S.SUBMITTING)
    #: No slot, or no budget today: in line, in arrival order, holding nothing.
    WAIT: Transition = Transition("wait", (Case(S.SUBMITTING),), S.WAITING, Index.LINE, clears=("from_line",))
    #: Taken from the line by a submit function that died before sending (it has no message): back in line.
    RETURN_TO_LINE: Transition = Transition(
        "return to line",
        (Case(S.SUBMITTING, Hold.LAPSED, Requires.FROM_LINE),),
        S.WAITING,
        Index.LINE,
        fixed=_FOR_A_SLOT,
        clears=("from_line",),
    )
    #: Its turn: a dispatcher holds it to send it.
    TAKE_WAITING: Transition = Transition(
        "its turn", (Case(S.WAITING, Hold.ANY),), S.SUBMITTING, takes_hold=True, fixed=(("from_line", True),), clears=_WAIT
    )
    #: The point of no return: from here the request may be at fal.
    BEGIN_SEND: Transition = Transition(
        "begin send", (Case(S.SUBMITTING, Hold.MINE_LIVE),), S.SENDING, keeps_hold=True, clears=("from_line",)
    )
    #: fal answered that it does not hold the request: the message's next delivery sends it again.
    NOT_ENQUEUED: Transition = Transition("not enqueued", (Case(S.SENDING),), S.SUBMITTING, clears=("sent_at_ms", *_GRANTS))
    #: fal does not hold it, and it came from the line: back in line.
    NOT_ENQUEUED_TO_LINE: Transition = Transition(
        "not enqueued, from the line", (Case(S.SENDING),), S.WAITING, Index.LINE, fixed=_FOR_A_SLOT, clears=("sent_at_ms", *_GRANTS)
    )
    #: fal accepted it. A sender whose hold lapsed mid-request may find its job UNCERTAIN: the request id it holds is
    #: the truth, so it is recorded all the same.
    MARK_SUBMITTED: Transition = Transition(
        "submitted",
        (Case(S.SENDING), Case(S.UNCERTAIN, Hold.ANY, Requires.NEW_REQUEST)),
        S.SUBMITTED,
        clears=("error_message",),
    )
    #: The sender cannot tell whether fal holds it: never sent again, settled by its webhook or recovery.
    MARK_UNCERTAIN: Transition = Transition("uncertain", (Case(S.SENDING),), S.UNCERTAIN)
    #: The sender died mid-request (its SENDING hold lapsed): the same, said by anyone who sees it.
    SENDER_DIED: Transition = Transition("sender died", (Case(S.SENDING, Hold.LAPSED),), S.UNCERTAIN)
    #: An UNCERTAIN job's signed webhook came: fal did accept it, under this request id.
    ADOPT_REQUEST: Transition = Transition(
        "request learned from its webhook",
        (Case(S.UNCERTAIN, Hold.ANY, Requires.NEW_REQUEST),),
        S.SUBMITTED,
        clears=("error_message",),
    )
    #: fal never started the request (its start timeout passed): in line again for a fresh try, with a fresh URL.
    REQUEUE: Transition = Transition(
        "requeue",
        (Case(S.SUBMITTED), Case(S.UNCERTAIN)),
        S.WAITING,
        Index.LINE,
        fixed=_FOR_A_SLOT,
        clears=(*_REQUEST, "sent_at_ms", "uncertain_since_ms", *_GRANTS),
    )
    COMPLETE: Transition = Transition(
        "complete", tuple(Case(state) for state in _OPEN), S.COMPLETED, Index.ENDED, clears=("error_code", "error_message", "error_key")
    )
    FAIL: Transition = Transition("fail", tuple(Case(state) for state in _OPEN), S.FAILED, Index.ENDED)

    def all(self) -> list[Transition]:
        return [getattr(self, entry.name) for entry in fields(self)]


T = Transitions()


def diagram() -> str:
    """The state diagram (Mermaid), from the table: one arrow per case, labelled with its name, hold and requirement."""
    lines = ["stateDiagram-v2", f"    [*] --> {S.SUBMITTING.value}: create (held by its creator)"]
    for transition in T.all():
        for case in transition.cases:
            words = [case.hold.words] + ([case.requires.name.lower().replace("_", " ")] if case.requires is not Requires.NOTHING else [])
            lines.append(f"    {case.source.value} --> {transition.target.value}: {transition.name} ({', '.join(words)})")
    lines += [f"    {S.COMPLETED.value} --> [*]", f"    {S.FAILED.value} --> [*]"]
    return "\n".join(lines) + "\n"
