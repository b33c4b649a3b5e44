"""The engine behind `tpx serve`: a reader thread, a bounded queue, writer threads.

The steps are functions that return values; the threads are the loops around them::

    Redis stream --XREADGROUP--> Reader: intake.take_in(page) -> Intake --Batch--> queue
        poison records, vanished ids: intake.settle -> XADD <stream>:dlq -> XACK
    queue --> Writer: commit.Committer.commit(batch) -> CommitOutcome -> post-commit stages
        COPY (or INSERT .. ON CONFLICT DO NOTHING) -> COMMIT -> XACK -> device state

`tpx claim` composes the same steps without the threads: XCLAIM -> intake -> commit.
"""
