"""The node's books with its peers: balances, verification, reconciliation, settlement,
netting and export. Shared by `aihub ledger …` (on the data folder) and the admin API (in the
running node); both talk to peers with signed requests.

One module a concern, each imported by name where it is used (this package re-exports
nothing, so that importing one concern does not import the others):

- `errors`: `BooksError`, what stops a ledger operation;
- `wire`: the page size and the bodies two nodes send each other about their books;
- `period`: our books with one peer since the last statement, and the store read a page at a time;
- `balance`, `verify`, `export`: our own books, read and checked without the peer;
- `link`: a signed link to a peer, its answers read bounded and decoded;
- `reconciliation`: both chains compared with the peer's copies, differences acted on;
- `resync`: our chain to a peer re-synced from its copy after a restore;
- `settlement`: statements proposed, countersigned, recovered and kept;
- `netting`: a transfer plan clearing the statements' balances;
- `served`: what we answer a peer about our books.
"""
