"""One router module per resource of the OIP v2 REST API."""
