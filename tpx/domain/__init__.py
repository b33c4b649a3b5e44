"""The domain: geofence membership and timing events from each device's fixes (pure logic).

Placeholder: the design is written below once the pieces are in.
"""
