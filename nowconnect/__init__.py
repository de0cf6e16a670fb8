"""
NowConnect: a reverse TCP tunnel.

Clients connect to a hub listener in the cloud; the hub carries each connection as a stream over
a WebSocket that an on-premises agent dialled out; the agent connects to the real target.
"""

__version__ = "0.1.0"
