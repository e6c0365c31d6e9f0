"""ferryctl, the command line client of the agent's HTTP API."""
