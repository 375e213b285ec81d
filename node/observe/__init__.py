"""The node seen from outside: its access log and how its log lines are written."""
