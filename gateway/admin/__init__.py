"""The admin plane: admin users with two factors, sessions, audit, and the
FastAPI routers for keys, users, clients and the audit log.

Nothing here runs in the request path of a worker; the workers only write the
client view (``gateway.clientview``) that the clients router reads.
"""
