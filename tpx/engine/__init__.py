"""The engine behind `tpx serve`: a reader thread, a bounded queue, writer threads.

Data path (one direction, one owner per step)::

    Redis stream --XREADGROUP--> Reader --decode--> Batch --queue--> Writer
        Writer: COPY -> INSERT .. ON CONFLICT DO NOTHING -> COMMIT -> XACK
                -> device state -> post-commit stages
    poison records: Reader -> XADD <stream>:dlq -> XACK
"""
