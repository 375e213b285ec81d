"""The PostgreSQL backend: one database shared by every process (and host) of a node."""
