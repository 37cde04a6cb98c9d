"""Sans-IO decoders of captured plaintext: bytes in, events out (see ../shared/STYLE.md).

Each decoder follows one connection. It is fed the bytes of each direction as the captured
process read or wrote them, split anywhere, and returns events (events.py). It never raises
anything but DecodeError; a caller that catches one marks the connection undecodable and
keeps passing its bytes through raw.
"""
