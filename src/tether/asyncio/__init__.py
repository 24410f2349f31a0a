"""Everything that touches sockets and processes: the agent and the client."""
