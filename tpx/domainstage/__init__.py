"""The engine stage that runs :mod:`tpx.domain` against the CMS's tables.

All the I/O of the domain lives here: finding and checking the CMS's ``geofences`` and
``timing_records`` tables (:mod:`tpx.domainstage.tables`), reading geofences from them and
reloading them when they change (:mod:`tpx.domainstage.geofences`), and the stage that writes
timing records (:mod:`tpx.domainstage.stage`). :mod:`tpx.domain` stays pure: values in, values
out. The engine does not import this package; ``tpx serve`` wires it in.
"""
