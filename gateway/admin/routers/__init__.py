"""One admin router per resource: sessions, users, keys, clients, audit."""
