"""The SQLite backend of `node.storage`: open it through `node.storage.open_store`."""
