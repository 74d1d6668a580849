"""Sans-I/O protocol state: the token, the holder's hop, the schedule. No sockets, no clock."""
