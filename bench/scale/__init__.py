"""`make scale`: N real `aihub serve` processes on loopback, joined by invites in a chosen
topology, and what the federation costs and how fast it converges (bench/README.md)."""
