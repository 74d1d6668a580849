"""Sans-I/O protocol state: the token, the orchestrator's hop, the holder's hop, the device agent's staging, the schedule. No sockets, no clock."""
